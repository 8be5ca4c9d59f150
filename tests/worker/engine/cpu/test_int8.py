"""int8 (registry `dtype = "int8"`, worker/engine/cpu/quantization.py) for every task type.

Two questions, two references:

1. Does the engine serve an int8 model exactly? Reference: the quantized model's own transformers forward /
   `generate`. Each executor kind runs its demo model loaded through `worker.registry.load_model` with dtype
   int8: classification and extractive QA packed, translation paged (and the `generate` fallback), generative
   QA on the paged causal-LM engine. Per-token activation scales make every row's result independent of the
   rest of the batch, so on these models the engines' load-time self-checks pass at their fp32 tolerances
   (packed 1e-4, seq2seq and causal 1e-3 relative) and results equal the int8 reference as the fp32 executor
   tests have them equal fp32's (scores within 1e-4, answers and tokens equal). Larger models hit int8
   rounding boundaries where the engine's fp32 attention differs from eager in the last bit, and then need the
   half-precision tolerance (`test_a_mid_size_int8_engine_is_within_the_half_precision_tolerance`).
2. How close is int8 to fp32? Reference: the same model loaded fp32. Measured on the demo models (64 synthetic
   sentences; 2026-12, AVX-512 VNNI/AMX CPU, the oneDNN int8 kernel; the fp32 emulation on other CPUs computes
   the same integers, so the same figures):

   ====================  ===========================================  =====================  ==============
   model                 agreement with fp32                          max |logit diff|       logit range
   ====================  ===========================================  =====================  ==============
   demo-classifier       labels 64/64                                 0.027                  ~1
   demo-multilabel       labels 64/64                                 0.079                  ~1.3
   demo-qa               start/end argmax 128/128                     0.086                  ~4.4
   demo-translator       teacher-forced greedy 248/250; 30/32 equal   0.071                  ~3.4
   demo-llm              teacher-forced greedy 497/512; 21/32 equal   0.0094                 ~0.7
   ====================  ===========================================  =====================  ==============

   (demo-llm's random logits are nearly flat, so near ties are common: free-running continuations part at
   the first tie and differ after it.) The asserted bounds below are these with margin. Larger shapes
   (BERT-base, the 56M Llama, Marian 512): bench/precision.py.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from executor_support import SCORE_TOLERANCE, TEXTS, pipeline_scores, reference_qa, request, run
from seq2seq_support import build_pair, random_inputs
from transformers import LlamaConfig, LlamaForCausalLM

from pagedq.shared.models import ClassifyRequest, GenerationOptions, QARequest, TaskType, TranslateRequest
from pagedq.shared.registry import ModelSpec, Registry
from pagedq.worker.demo.corpus import ENGLISH_WORDS, synthetic_sentences
from pagedq.worker.demo.models import LLM_PROMPT
from pagedq.worker.engine.core.executor import EngineConfig, LoadedModel
from pagedq.worker.engine.cpu.linear import PackedLinear, prepack_linears
from pagedq.worker.engine.cpu.quantization import (
    EMULATED,
    ONEDNN,
    Int8Linear,
    emulated_int8,
    int8_kernel,
    quantization_summary,
    quantize_int8,
)
from pagedq.worker.engine.decoder_only import self_check as causal_self_check
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine
from pagedq.worker.engine.seq2seq.self_check import self_check
from pagedq.worker.engine.tasks.classify import ClassificationExecutor
from pagedq.worker.engine.tasks.extractive_qa import ExtractiveQAExecutor
from pagedq.worker.engine.tasks.generative import QA_STOP, GenerativeExecutor
from pagedq.worker.engine.tasks.translate import Seq2SeqExecutor
from pagedq.worker.registry import load_model, resolve_dtype
from worker.engine.families import build_family
from worker.engine.helpers import random_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTENCES = synthetic_sentences(ENGLISH_WORDS, 64, 7)
#: max |logit difference| int8 vs fp32 allowed (measured: module docstring), and the least teacher-forced
#: greedy agreement
MAX_LOGIT_DIFF = {"demo-classifier": 0.06, "demo-multilabel": 0.16, "demo-qa": 0.17, "demo-translator": 0.15,
                  "demo-llm": 0.02}  # fmt: skip
MIN_GREEDY_AGREEMENT = {"demo-translator": 0.96, "demo-llm": 0.93}


def load(demo_models: Path, name: str, dtype: str = "int8") -> LoadedModel:
    """Through the worker's own loader, with the registry entry's dtype replaced."""
    registry = Registry.load(demo_models)
    spec = ModelSpec.model_validate({**registry.models[name].model_dump(), "dtype": dtype})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        return load_model(spec, registry, "cpu")


@pytest.fixture(scope="module")
def int8_models(demo_models: Path) -> dict[str, LoadedModel]:
    """The executors' models (packing and paged executors change their attention)."""
    names = ("demo-classifier", "demo-multilabel", "demo-qa", "demo-translator", "demo-llm")
    return {name: load(demo_models, name) for name in names}


@pytest.fixture(scope="module")
def int8_reference(demo_models: Path) -> dict[str, LoadedModel]:
    """Separate int8 copies that only transformers runs."""
    names = ("demo-classifier", "demo-multilabel", "demo-qa", "demo-translator", "demo-llm")
    return {name: load(demo_models, name) for name in names}


# ---- the registry ---------------------------------------------------------------------------------


def test_int8_is_a_registry_dtype_and_a_bad_one_is_a_validation_error(tmp_path: Path) -> None:
    toml = tmp_path / "registry.toml"
    toml.write_text('[models.s]\ntask = "classify"\nsource = "./s"\ndtype = "int8"\n')
    assert Registry.load(toml).models["s"].dtype == "int8"
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        ModelSpec(task=TaskType.CLASSIFY, source="x", dtype="int4")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="CPU only"):
        ModelSpec(task=TaskType.CLASSIFY, source="x", dtype="int8", device="cuda:0")
    assert ModelSpec(task=TaskType.CLASSIFY, source="x", dtype="int8", device="cpu").dtype == "int8"


def test_int8_computes_in_fp32_and_is_refused_off_cpu() -> None:
    spec = ModelSpec(task=TaskType.CLASSIFY, source="x", dtype="int8")
    assert resolve_dtype(spec, torch.device("cpu")) == torch.float32  # the activations' dtype
    with pytest.raises(ValueError, match="CPU only.*bfloat16"):
        resolve_dtype(spec, torch.device("cuda"))  # before anything is loaded: PAGEDQ_DEVICE=cuda refuses it


def test_load_model_quantizes_the_linear_layers(int8_models: dict[str, LoadedModel]) -> None:
    for name, lm in int8_models.items():
        assert lm.dtype == torch.float32 and lm.spec.dtype == "int8"
        summary = quantization_summary(lm.model)
        assert summary is not None and summary.quantized > 0 and summary.kernel == int8_kernel(), name
        assert "int8" in summary.describe()
    classifier = int8_models["demo-classifier"].model
    assert type(classifier.classifier) is torch.nn.Linear and type(classifier.bert.pooler.dense) is torch.nn.Linear
    assert isinstance(classifier.bert.encoder.layer[0].attention.self.query, Int8Linear)
    assert classifier.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.int8
    translator = int8_models["demo-translator"].model
    cross = translator.model.decoder.layers[0].encoder_attn  # its K/V projections run once per request
    assert all(isinstance(getattr(cross, name), Int8Linear) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert isinstance(translator.lm_head, Int8Linear)
    assert translator.model.shared.weight.dtype == torch.float32  # embeddings stay fp32
    assert isinstance(int8_models["demo-llm"].model.lm_head, Int8Linear)


# ---- the layer ------------------------------------------------------------------------------------


def _quantization_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x.w - int8 result| <= ws/2 sum|x| + s/2 sum|w| + K s ws / 4, with s = max|x_row|/127, ws = max|w_col|/127."""
    s = x.abs().amax(1, keepdim=True) / 127
    ws = w.abs().amax(1) / 127
    return ws / 2 * x.abs().sum(1, keepdim=True) + s / 2 * w.abs().sum(1) + x.shape[1] * s * ws / 4


@pytest.mark.parametrize("kernel", [ONEDNN, EMULATED])
def test_int8_linear_is_within_its_quantization_bound_and_batch_invariant(kernel: str) -> None:
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(12, 256, generator=g)
    x[:, 7] *= 30  # an outlier channel, as LLM activations have
    x[3] = 0  # an all-zero row
    layer = Int8Linear.from_float(linear)
    with torch.no_grad(), emulated_int8() if kernel == EMULATED else nullcontext():
        got = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        want = linear(x)
    assert torch.equal(got, alone)  # a row's result does not depend on the other rows
    assert ((got - want).abs() <= _quantization_bound(x, linear.weight) + 1e-5).all()
    assert torch.equal(got[3], linear.bias.detach())


@pytest.mark.parametrize("in_features", [64, 1024, 3072])
def test_the_int8_kernel_and_its_fp32_emulation_agree(in_features: int) -> None:
    """Bit for bit up to 1040 input features (fp32 sums the int8 products exactly), within fp32 rounding above.
    (Where the CPU lacks VNNI both run the emulation.)"""
    g = torch.Generator().manual_seed(1)
    layer = Int8Linear(torch.randn(80, in_features, generator=g) * 0.05, torch.randn(80, generator=g))
    x = torch.randn(3, 5, in_features, generator=g)  # leading dims are kept
    with torch.no_grad():
        native = layer(x)
        with emulated_int8():
            emulated = layer(x)
    assert native.shape == (3, 5, 80)
    if in_features <= 1040:
        assert torch.equal(native, emulated)
    else:
        torch.testing.assert_close(native, emulated, rtol=1e-6, atol=1e-5)


def test_cpu_prepacking_skips_int8_layers_and_copies_work(int8_reference: dict[str, LoadedModel]) -> None:
    model = copy.deepcopy(int8_reference["demo-classifier"].model)
    kept = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert prepack_linears(model, min_weight=0) == len(kept) == 2  # the task head and the pooler
    assert all(type(m) is PackedLinear for m in kept)
    assert all(type(m) is Int8Linear for m in model.modules() if isinstance(m, Int8Linear))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = int8_reference["demo-classifier"].model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, want)
        restored = pickle.loads(pickle.dumps(model))  # the packed oneDNN weights stay behind and are rebuilt
        assert torch.equal(restored(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4, device="meta")))


# ---- every executor kind against the quantized model's own transformers -----------------------


@pytest.mark.parametrize("name", ["demo-classifier", "demo-multilabel"])
def test_classify_int8_packed_equals_its_own_forward(
    int8_models: dict[str, LoadedModel], int8_reference: dict[str, LoadedModel], name: str
) -> None:
    lm = int8_models[name]
    executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=512, max_running_requests=16))
    assert executor.forward.packed, executor.forward.path_reason  # the packing self-check passed at 1e-4
    reqs = [request(TaskType.CLASSIFY, ClassifyRequest(text=t, top_k=None), name) for t in TEXTS]
    run(executor, reqs)
    for req, text in zip(reqs, TEXTS, strict=True):
        got, want = req.future.result(timeout=0), pipeline_scores(int8_reference[name], text)
        assert [s.label for s in got.scores] == [w["label"] for w in want]
        assert [s.score for s in got.scores] == pytest.approx([w["score"] for w in want], abs=SCORE_TOLERANCE)


def test_extractive_qa_int8_packed_equals_its_own_forward(
    int8_models: dict[str, LoadedModel], int8_reference: dict[str, LoadedModel]
) -> None:
    lm = int8_models["demo-qa"]
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=2048, max_running_requests=8))
    assert executor.forward.packed, executor.forward.path_reason
    questions = [("Where is the tower?", TEXTS[4]), ("Who answered?", TEXTS[2]), ("What?", " ".join(TEXTS * 12))]
    reqs = [request(TaskType.QA, QARequest(question=q, context=c, max_answer_len=15), "demo-qa") for q, c in questions]
    run(executor, reqs)
    for req, (question, context) in zip(reqs, questions, strict=True):
        got, want = req.future.result(timeout=0), reference_qa(int8_reference["demo-qa"], question, context, 15, False)
        assert (got.answer, got.start, got.end) == (want["answer"], want["start"], want["end"])
        assert got.score == pytest.approx(want["score"], abs=SCORE_TOLERANCE)


def _translation(lm: LoadedModel, text: str, **generate: Any) -> str:
    inputs = lm.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**inputs, **generate)[0, 1:].tolist()
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def test_translate_int8_paged_and_fallback_equal_its_own_generate(
    int8_models: dict[str, LoadedModel], int8_reference: dict[str, LoadedModel]
) -> None:
    lm, ref = int8_models["demo-translator"], int8_reference["demo-translator"]
    executor = Seq2SeqExecutor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=16))
    assert executor.engine is not None and executor.stats().path == "paged", executor.path_reason  # self-check
    greedy = [request(TaskType.TRANSLATE, TranslateRequest(text=t), "demo-translator") for t in TEXTS]
    beams = [
        request(TaskType.TRANSLATE, TranslateRequest(text=t, generation=GenerationOptions(num_beams=3,
                max_new_tokens=12)), "demo-translator")  # fmt: skip
        for t in TEXTS[:3]
    ]
    run(executor, greedy + beams)
    for req, text in zip(greedy, TEXTS, strict=True):
        assert req.future.result(timeout=0).translation == _translation(ref, text)
    for req, text in zip(beams, TEXTS, strict=False):
        assert req.future.result(timeout=0).translation == _translation(ref, text, num_beams=3, max_length=13)
    lm.model.generation_config.repetition_penalty = 1.3  # not on the paged path: batched generate
    ref.model.generation_config.repetition_penalty = 1.3
    try:
        fallback = [request(TaskType.TRANSLATE, TranslateRequest(text=t), "demo-translator") for t in TEXTS[:3]]
        run(executor, fallback)
        assert executor.stats().extra["num_fallback_requests"] == 3
        for req, text in zip(fallback, TEXTS, strict=False):
            assert req.future.result(timeout=0).translation == _translation(ref, text)
    finally:
        lm.model.generation_config.repetition_penalty = None
        ref.model.generation_config.repetition_penalty = None


def _expected_answer(lm: LoadedModel, question: str, context: str) -> tuple[str, int]:
    """Per-request greedy `generate`, cut where the executor stops (EOS or a QA stop string)."""
    tok = lm.tokenizer
    prompt = tok.encode(LLM_PROMPT.format(context=context, question=question))
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([prompt]), do_sample=False)[0, len(prompt) :].tolist()
    while out and out[-1] == tok.pad_token_id:
        out.pop()
    for n in range(1, len(out) + 1):
        text = tok.decode(out[:n], skip_special_tokens=True)
        if any(s in text for s in QA_STOP):
            return text[: min(text.find(s) for s in QA_STOP if s in text)].strip(), n
    return tok.decode(out, skip_special_tokens=True).strip(), len(out)


def test_generative_qa_int8_paged_equals_its_own_generate(
    int8_models: dict[str, LoadedModel], int8_reference: dict[str, LoadedModel]
) -> None:
    lm = int8_models["demo-llm"]
    executor = GenerativeExecutor(lm, EngineConfig(block_size=4, max_batch_tokens=64), num_blocks=256)
    assert executor.stats().path == "paged"  # built: its self-check passed at the fp32 tolerance
    asks = [("Who built the tower?", TEXTS[4]), ("Why?", TEXTS[2]), ("When?", TEXTS[4]), ("What?", TEXTS[6])]
    reqs = [request(TaskType.QA, QARequest(question=q, context=c, mode="generative"), "demo-llm") for q, c in asks]
    run(executor, reqs, max_steps=500)
    for req, (question, context) in zip(reqs, asks, strict=True):
        got = req.future.result(timeout=0)
        assert (got.answer, got.output_tokens) == _expected_answer(int8_reference["demo-llm"], question, context)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen3", "opt"])
def test_causal_families_int8_paged_greedy_equals_generate(family: str) -> None:
    """Sharp attention (tests/worker/engine/families.py); GPT-2's Conv1D layers are quantized too."""
    tiny = build_family(family)
    quantize_int8(tiny.model)
    quantize_int8(tiny.reference)
    assert quantization_summary(tiny.model).quantized >= 9  # type: ignore[union-attr]
    engine = LLMEngine(tiny.model, config=EngineConfig(block_size=4, max_batch_tokens=24), num_blocks=128,
                       namespace=family)  # fmt: skip  # raises UnsupportedModel if its self-check fails
    prompts = random_prompts([3, 17, 9, 30], seed=2)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    for i, prompt in enumerate(prompts):
        assert done[f"r{i}"].output_token_ids == tiny.expected(prompt, 10), f"{family} r{i}"


@pytest.mark.parametrize("arch", ["marian", "bart", "t5", "m2m100"])
def test_seq2seq_families_int8_pass_the_self_check_and_equal_generate(arch: str) -> None:
    pair = build_pair(arch, sharp=True)
    quantize_int8(pair.model)
    quantize_int8(pair.reference)
    engine = Seq2SeqEngine(pair.model, EngineConfig(max_batch_tokens=256, block_size=4), num_blocks=256)
    verdict = self_check(engine)
    assert verdict.passed, verdict.reason  # at the fp32 tolerance (1e-3 relative)
    inputs = random_inputs(6, lengths=(3, 24))
    outputs = engine.generate(inputs, decode_settings(pair.model, GenerationOptions(max_new_tokens=8)))
    for ids, out in zip(inputs, outputs, strict=True):
        assert out.output_token_ids == pair.generate(ids, max_new_tokens=8)
    # beams: the int8 model's fp32 logits are normalized and selected by the native pass (one read of each
    # row, not torch's log-softmax then top-k): the same beams as the int8 model's own generate here
    assert not engine.decoding.exact_log_softmax
    beams = engine.generate(inputs, decode_settings(pair.model, GenerationOptions(max_new_tokens=8, num_beams=3)))
    for ids, out in zip(inputs, beams, strict=True):
        assert out.output_token_ids == pair.generate(ids, max_new_tokens=8, num_beams=3)


def test_a_mid_size_int8_engine_is_within_the_half_precision_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounding an activation to int8 is a step function: where the engine's fp32 attention differs from the
    eager forward's in the last bit (~1e-6), a value at a rounding boundary lands one step apart, and the step
    propagates. The tiny models above never hit a boundary; wider and deeper ones do (measured: this 4 x 256
    Llama 1.1e-2 and 1.0e-2 for seeds 0 and 2; the W1 56M Llama 2.2e-2, BERT-base's packing probe 7.3e-3 --
    bf16: 1.1e-2 and 1.1e-2). So int8 models need the self-checks' half-precision tolerance, not fp32's 1e-3
    (module docstring of worker/engine/cpu/quantization.py)."""
    monkeypatch.setitem(causal_self_check.LOGIT_TOLERANCE, torch.float32, causal_self_check.HALF_TOLERANCE)
    for seed in (0, 2):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
        model = quantize_int8(LlamaForCausalLM(config).eval())
        engine = LLMEngine(model, config=EngineConfig(block_size=4, max_batch_tokens=16), num_blocks=64,
                           namespace=f"int8-mid-{seed}", self_check=False)  # fmt: skip
        assert causal_self_check.self_check(engine).max_logit_error <= causal_self_check.HALF_TOLERANCE / 3


# ---- against fp32 -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo-classifier", "demo-multilabel", "demo-qa"])
def test_encoders_int8_against_fp32(demo_models: Path, int8_reference: dict[str, LoadedModel], name: str) -> None:
    """Labels (QA: start and end tokens) agree wherever fp32's top two are apart by more than twice the bound
    (they must); the largest logit difference stays under the bound."""
    fp32, int8 = load(demo_models, name, "float32"), int8_reference[name]
    worst, checked = 0.0, 0
    for text in SENTENCES:
        inputs = fp32.tokenizer(text, "Where?" if name == "demo-qa" else None, return_tensors="pt")
        with torch.no_grad():
            a, b = fp32.model(**inputs), int8.model(**inputs)
        pairs = [(a.start_logits, b.start_logits), (a.end_logits, b.end_logits)] if name == "demo-qa" else [
            (a.logits, b.logits)]  # fmt: skip
        for want, got in pairs:
            worst = max(worst, float((want - got).abs().max()))
            top = want[0].topk(2).values
            if float(top[0] - top[1]) > 2 * MAX_LOGIT_DIFF[name]:
                assert int(got.argmax()) == int(want.argmax())
                checked += 1
    assert worst <= MAX_LOGIT_DIFF[name]
    assert checked >= len(SENTENCES) // 2  # the check compared most inputs


@pytest.mark.parametrize("name", ["demo-translator", "demo-llm"])
def test_generators_int8_against_fp32(demo_models: Path, int8_reference: dict[str, LoadedModel], name: str) -> None:
    """Teacher-forced along fp32's greedy output: the share of steps whose greedy token int8 picks too, and the
    largest logit difference."""
    fp32, int8 = load(demo_models, name, "float32"), int8_reference[name]
    agree = steps = 0
    worst = 0.0
    for text in SENTENCES[:24]:
        with torch.no_grad():
            if name == "demo-translator":
                enc = fp32.tokenizer(text, return_tensors="pt")
                out = fp32.model.generate(**enc, do_sample=False)
                want = fp32.model(**enc, decoder_input_ids=out[:, :-1]).logits[0]
                got = int8.model(**enc, decoder_input_ids=out[:, :-1]).logits[0]
            else:
                prompt = fp32.tokenizer(LLM_PROMPT.format(context=text, question="What?"), return_tensors="pt")
                out = fp32.model.generate(prompt.input_ids, do_sample=False, max_new_tokens=16)
                start = prompt.input_ids.shape[1] - 1
                want = fp32.model(out[:, :-1]).logits[0, start:]
                got = int8.model(out[:, :-1]).logits[0, start:]
        finite = torch.isfinite(want)  # banned tokens are -inf in both
        worst = max(worst, float((want - got)[finite].abs().max()))
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        steps += want.shape[0]
    assert worst <= MAX_LOGIT_DIFF[name]
    assert agree / steps >= MIN_GREEDY_AGREEMENT[name], f"{agree}/{steps}"


def test_the_fastest_exact_int8_kernel_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel probe times every exact candidate and keeps the fastest: a CPU whose oneDNN int8 GEMM is slow
    (some VNNI CPUs get a reference kernel, 500x slower than fp32) runs another; every candidate gives the same
    integers (test above), and each one found here passed the worst-case exactness probe."""
    from pagedq.worker.engine.cpu import quantization

    candidates = quantization._candidates()
    assert EMULATED in candidates
    for product in candidates.values():
        product()  # each runs for real
    order = list(candidates)
    speeds = {name: 1.0 + i for i, name in enumerate(reversed(order))}  # the last found is the fastest
    timed = iter([speeds[name] for name in order])
    monkeypatch.setattr(quantization, "_best_seconds", lambda fn, repeats=5, give_up=0.0: next(timed))
    monkeypatch.delenv("PAGEDQ_INT8_KERNEL", raising=False)
    quantization._probe.cache_clear()
    quantization._best_kernel.cache_clear()
    try:
        assert quantization._best_kernel() == order[-1] and quantization.int8_kernel() == order[-1]
    finally:
        quantization._probe.cache_clear()
        quantization._best_kernel.cache_clear()
