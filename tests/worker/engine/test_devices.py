"""The engine on every device torch has here, against transformers on the SAME device.

Every test runs once per device in `DEVICES`: "cpu" always, "cuda" where `torch.cuda.is_available()`. The
engine takes its device from the model (`model.device`: the KV pages, the step's index tensors and the
attention all follow it; there is no device argument), so each test builds its models on the CPU (seeded),
moves them to the device, and compares with transformers' own `generate`, forward or pipeline on that device.
Without a GPU only the CPU cases exist, and they are real tests (the CPU twins of the CUDA cases); with CUDA,

    pytest tests/worker/engine/test_devices.py            # both devices
    pytest tests/worker/engine/test_devices.py -k cuda    # the GPU cases only

What it proves, per device (tiny random models; 12-25 s on the shared 2-core CPU, as loaded):

1. decoder-only, fp32 (Llama, Qwen2 with a sliding layer, GPT-2, Gemma-2 with soft-capping and a sliding
   layer, GPT-OSS with sinks; attention sharpened to scores ~30, `families.sharpen`): requests of different
   lengths joining mid-flight, prompts chunked by a 16-token budget, prefix-cache hits and shared-prefix
   (cascade) decode rows -- greedy output equals `generate` token for token, and every sampled logits row is
   within `LOGIT_TOL` of transformers' forward of that request alone. The load-time self-check accepts the
   model (`decoder_only/self_check.py`): a test of its own, the equivalence tests build their engines with
   `self_check=False`, so that a failure of one does not hide the other;
2. decoder-only, bf16 (the sharpened 8-head GQA Llama of test_bf16_engine.py, cast after building): the
   engine's bf16 logits within `BF16_TOL` of transformers' own bf16 forward, greedy equal to bf16 `generate`
   but after near-ties (`TIE`; at least half the requests equal throughout); against the fp32 model on the
   same device: every request's first token equal unless fp32's own top two are within `FP32_TIE`, the
   teacher-forced picks agreeing on `FP32_AGREE` of the steps (the rest near fp32 ties), the logits within
   `FP32_TOL` of fp32's and no further than transformers' own bf16 is (plus `BF16_TOL`). Measured on the
   AMD EPYC CPU: max 0.027 from transformers' bf16, 7 of 8 requests equal throughout, 60 of 64 picks as fp32's,
   0.095 from fp32 (transformers' bf16: 0.098);
3. encoder-decoder, fp32 (Marian, BART, T5 with its relative bias; sharpened): the self-check passes; logits
   teacher-forced on random tokens within `LOGIT_TOL` (relative) of transformers' forward (random weights
   often repeat one token, which hides self-attention errors); greedy and beam 4 equal `generate` token for
   token, requests joining mid-flight;
4. the classification and extractive-QA executors on the demo models, loaded by `load_model`: fp32 scores
   within `SCORE_TOLERANCE` of transformers' pipeline (classification) or the v4 QA pipeline (`reference_qa`)
   on the same device, the packed path accepted by its self-check; bf16: classifier scores within
   `BF16_SCORE_TOL` of fp32's (measured 0.002) and the label fp32's wherever fp32's top two are more than
   `CLEAR_MARGIN` apart; QA answers as fp32's (all of them, measured; one may differ);
5. loading the way the worker does, dtype "auto": auto is bf16 on CUDA (fp16 on a card without bf16) and,
   on CPU, bf16 only with AMX (else fp32); `runtime.load_executors` (the worker's start-up: `load_model` and
   `make_executor` per registry entry) refuses none of the five demo models, i.e. every load-time self-check
   accepts its model (packed classifiers and QA, the paged Marian, the paged Llama); and a request through
   the classifier, the translator and the generative-QA executor answers as transformers on that device in
   that dtype (exactly in fp32; up to near-ties, `HALF_TIE`, in half precision);
6. `dtype = "int8"` is CPU only: refused when the spec is validated (device "cuda:0") or before loading
   (worker device CUDA); accepted and quantized on CPU.

Attention paths. Tests 1-3 run the engines' portable attention (`native_decode=False`: gather + SDPA, the
shared-prefix merge, SDPA for cross-attention) on every device: that is the only path on CUDA (the native
kernels are CPU-only and are skipped there by a device check), so a CPU pass and a CUDA failure point at the
device, not at the path. The CPU's native kernels have their own tests (test_family_equivalence.py,
test_seq2seq_engine.py, cpu/); tests 4-5 run whatever the executor picks, as the worker does.

fp32 on CUDA: TF32 would round every fp32 GEMM's inputs to 10 mantissa bits, and "exact" would compare two
TF32 programs. `torch.backends.cuda.matmul.allow_tf32` is False by default; `ieee_fp32_matmuls` makes sure
of it for this module (a plugin, an earlier test or a site customization may have set "high"), and
`test_fp32_matmuls_are_ieee` checks it with a GEMM against float64. (cuDNN's TF32 flag only touches
convolutions, which none of these models run; bf16 GEMMs on CUDA may reduce in reduced precision,
`allow_bf16_reduced_precision_reduction`, for transformers' reference too: the bf16 tolerances cover it.)
fp32 GEMMs still round differently with the batch's shape, on CUDA as on CPU (~1e-6 here): logits are held
to `LOGIT_TOL`, and greedy tokens are held equal, as the CPU tests hold them (a flip needs two logits within
that rounding; where tokens differ, the message gives transformers' margin between the two picks).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from executor_support import SCORE_TOLERANCE, TEXTS, demo_registry_copy, long_text, reference_qa, request
from executor_support import run as run_executor
from seq2seq_support import FIRST_WORD, VOCAB, build_pair, random_inputs, teacher_forced_logits
from transformers import pipeline

from pagedq.shared.models import ClassifyRequest, GenerationOptions, QARequest, TaskType, TranslateRequest
from pagedq.shared.registry import ModelSpec, Registry
from pagedq.worker.engine.core.executor import EngineConfig, LoadedModel
from pagedq.worker.engine.core.request import RequestOutput
from pagedq.worker.engine.cpu.quantization import quantization_summary
from pagedq.worker.engine.decoder_only import runner as model_runner
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoder_only.self_check import LOGIT_TOLERANCE, self_check
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings
from pagedq.worker.engine.paged.decode_plan import DecodePlan
from pagedq.worker.engine.seq2seq import self_check as seq2seq_self_check
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine
from pagedq.worker.engine.service import make_executor
from pagedq.worker.engine.tasks.classify import ClassificationExecutor
from pagedq.worker.engine.tasks.extractive_qa import ExtractiveQAExecutor
from pagedq.worker.engine.tasks.generative import GenerativeExecutor
from pagedq.worker.engine.tasks.translate import Seq2SeqExecutor
from pagedq.worker.registry import cpu_has_fast_bf16, load_model, resolve_dtype
from pagedq.worker.runtime import load_executors
from worker.engine.families import build_family, sharp_gqa_llama
from worker.engine.helpers import random_prompts, recorded_logits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
on_devices = pytest.mark.parametrize("device", DEVICES)
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses"),
]

LOGIT_TOL = 1e-4  # fp32, absolute: logits of these models are O(1..10)
FP32_FAMILIES = ["llama", "qwen2", "gpt2", "gemma2", "gpt_oss"]
# bf16 (test_bf16_engine.py's numbers, measured on CPU; transformers' own bf16 on the same device is the bar)
TIE = 0.05
BF16_TOL = 0.05
FP32_TOL = 0.25
FP32_AGREE = 0.85
FP32_TIE = 0.1
BF16_LENGTHS = [3, 17, 40, 64, 90, 8, 25, 49]
BF16_NEW_TOKENS = 8
#: half precision through the executors: a greedy token may differ from transformers' only where transformers'
#: own top two are this close, relative to max(1, max |logit|) (the engines' load-time self-check tolerance)
HALF_TIE = 6e-2
#: bf16 classifier scores (probabilities) against fp32's, and the fp32 top-2 margin above which labels must agree
BF16_SCORE_TOL = 0.02
CLEAR_MARGIN = 0.05
QUESTIONS = [
    ("Where is the Eiffel tower?", TEXTS[4]),
    ("Who answered?", TEXTS[2]),
    ("What was wonderful?", TEXTS[6] + " " + TEXTS[0]),
    ("When was the tower built?", long_text(600)),  # several windows
]


@pytest.fixture(scope="module", autouse=True)
def ieee_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls in full fp32 (no TF32) while this module runs; the setting as it was afterwards."""
    before = torch.get_float32_matmul_precision()
    if before != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if before != "highest":
            torch.set_float32_matmul_precision(before)


# ---- helpers ----------------------------------------------------------------------------------------


def ids_on(device: str | torch.device, ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=device)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def causal_generate(model: Any, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy `generate` of one prompt alone (no padding) on the model's device. The attention mask
    is explicit: without one, `generate` masks every prompt token equal to the pad token id (a BOS that is 0)."""
    ids = ids_on(model.device, prompt)
    pad = model.generation_config.pad_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0 if pad is None else pad)  # fmt: skip
    return list(out[0, len(prompt) :].tolist())


def causal_logits(model: Any, prompt: Sequence[int], output: Sequence[int]) -> torch.Tensor:
    """transformers' own forward (no cache) of one request alone, on the model's device: the logits that chose
    each output token, [len(output), vocab] fp32 on the CPU."""
    with torch.no_grad():
        logits = model(input_ids=ids_on(model.device, [*prompt, *output[:-1]]), use_cache=False).logits[0]
    return logits[len(prompt) - 1 :].float().cpu()


def seq2seq_generate(model: Any, encoder_ids: Sequence[int], **kwargs: Any) -> list[int]:
    """transformers' `generate` of one input alone on the model's device, the decoder start removed."""
    ids = ids_on(model.device, encoder_ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, 1:].tolist())


def seq2seq_logits(model: Any, encoder_ids: Sequence[int], output: Sequence[int]) -> torch.Tensor:
    """transformers' forward teacher-forced on `output`: [len(output), vocab] fp32 on the CPU."""
    start = model.generation_config.decoder_start_token_id
    with torch.no_grad():
        decoder = ids_on(model.device, [start, *output[:-1]])
        return model(input_ids=ids_on(model.device, encoder_ids), decoder_input_ids=decoder).logits[0].float().cpu()


def first_difference(got: Sequence[int], want: Sequence[int]) -> int | None:
    """The first step where two token lists differ (a length difference counts), None if equal."""
    for step, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return step
    return None if len(got) == len(want) else min(len(got), len(want))


def margin_at(logits: torch.Tensor, step: int, got: Sequence[int], want: Sequence[int]) -> float:
    """|logit(want) - logit(got)| at `step` of a reference's logits rows (inf past either list)."""
    if step >= min(len(got), len(want), logits.shape[0]):
        return float("inf")
    return abs(float(logits[step, want[step]] - logits[step, got[step]]))


def assert_tokens(got: Sequence[int], want: Sequence[int], logits: torch.Tensor, what: str) -> None:
    """Equal token lists; on failure, say where they part and how close the reference's two picks were."""
    step = first_difference(got, want)
    if step is not None:
        margin = margin_at(logits, step, got, want)
        raise AssertionError(f"{what}: token {step} differs from transformers' ({list(got)} vs {list(want)}; "
                             f"transformers' logits of the two picks differ by {margin:.3g})")  # fmt: skip


def equal_but_for_near_ties(got: Sequence[int], want: Sequence[int], logits: torch.Tensor, tie: float,
                            what: str) -> bool:  # fmt: skip
    """True when equal; False when they part where the reference's two picks are within `tie` (a near tie, which
    may go either way in half precision); raises otherwise."""
    step = first_difference(got, want)
    if step is None:
        return True
    margin = margin_at(logits, step, got, want)
    assert margin <= tie, f"{what}: token {step} differs from transformers' by a logit margin of {margin:.3g}"
    return False


# ---- precondition: fp32 is fp32 ---------------------------------------------------------------------


@on_devices
def test_fp32_matmuls_are_ieee(device: str) -> None:
    """TF32 off (module docstring): the flag, and a GEMM whose error TF32 would multiply by ~1000."""
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=gen), torch.randn(512, 64, generator=gen)
    exact = a.double() @ b.double()
    got = (a.to(device) @ b.to(device)).cpu().double()
    relative = float((got - exact).abs().max() / exact.abs().max())
    assert relative < 1e-5, f"fp32 GEMM on {device} is {relative:.2g} from float64: TF32?"


# ---- 1. decoder-only, fp32 --------------------------------------------------------------------------


@on_devices
@pytest.mark.parametrize("name", FP32_FAMILIES)
def test_decoder_only_fp32_equals_generate(name: str, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tm = build_family(name)
    model, reference = tm.model.to(device), tm.reference.to(device)
    config = EngineConfig(max_batch_tokens=16, max_running_requests=6, block_size=4)
    # self_check=False: the load-time probe has a test of its own (module docstring)
    engine = LLMEngine(model, config=config, num_blocks=128, namespace=name, cascade_min_tokens=4,
                       native_decode=False, self_check=False)  # fmt: skip
    assert engine.cache.key_cache.device.type == device and not engine.runner.native_decode
    shared = random_prompts([9], seed=7)[0]  # 2 full blocks of 4 + 1
    prompts = random_prompts([3, 21, 40], seed=2) + random_prompts([5, 2, 7], seed=3, prefix=shared)
    new = [6, 5, 7, 8, 6, 5]
    names = ["p0", "p1", "p2", "s0", "s1", "s2"]
    # s0 first; s1 and s2 join once its prompt is cached (prefix hits), p1 and p2 while others decode
    schedule = {"p0": 0, "s0": 0, "p1": 2, "s1": 4, "p2": 4, "s2": 6}
    arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]] = {}
    for rid, prompt, n in zip(names, prompts, new, strict=True):
        arrivals.setdefault(schedule[rid], []).append((rid, prompt, greedy(n)))
    plans: list[DecodePlan] = []
    real_plan = model_runner.plan_decode

    def recording_plan(*args: Any) -> DecodePlan:
        plans.append(real_plan(*args))
        return plans[-1]

    monkeypatch.setattr(model_runner, "plan_decode", recording_plan)
    done: dict[str, RequestOutput] = {}
    with recorded_logits(engine) as logits:
        for step in range(500):
            for rid, prompt, params in arrivals.get(step, []):
                engine.add_request(rid, prompt, params)
            if step > max(arrivals) and not engine.has_unfinished_requests():
                break
            done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert any(p.cascades for p in plans) and any(p.buckets for p in plans)  # both decode paths ran
    assert done["s1"].num_cached_tokens == 8 and done["s2"].num_cached_tokens == 8  # the shared full blocks
    assert engine.stats().kv_cache_usage_perc == 0.0
    for rid, prompt, n in zip(names, prompts, new, strict=True):
        got = done[rid].output_token_ids
        ref = causal_logits(reference, prompt, got)
        assert_tokens(got, causal_generate(reference, prompt, n), ref, f"{name} {rid} on {device}")
        rows = torch.stack(logits[rid])
        assert rows.device.type == device
        err = float((rows.float().cpu() - ref).abs().max())
        assert err < LOGIT_TOL, f"{name} {rid} on {device}: logits differ from transformers' by {err:.2e}"


@on_devices
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_oss"])
def test_decoder_only_self_check_accepts(name: str, device: str) -> None:
    """The load-time probe (the engine against the model's own eager forward on the device) passes, built as
    the worker builds it (`self_check` on) and called again on its own to read its measure."""
    model = build_family(name).model.to(device)
    engine = LLMEngine(model, config=EngineConfig(block_size=4, max_batch_tokens=16), num_blocks=64, namespace=name)
    result = self_check(engine)
    assert result.tolerance == LOGIT_TOLERANCE[torch.float32]
    assert result.max_logit_error <= result.tolerance
    assert not engine.has_unfinished_requests() and engine.stats().kv_cache_usage_perc == 0.0


# ---- 2. decoder-only, bf16 --------------------------------------------------------------------------


@on_devices
def test_decoder_only_bf16_against_transformers_bf16_and_fp32(device: str) -> None:
    fp32 = sharp_gqa_llama()
    model = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16_ref = copy.deepcopy(model).to(device)
    fp32, model = fp32.to(device), model.to(device)
    config = EngineConfig(block_size=16, max_batch_tokens=48, max_running_requests=8)
    engine = LLMEngine(model, config=config, num_blocks=64, native_decode=False, self_check=False)
    assert engine.cache.key_cache.dtype == torch.bfloat16 and engine.cache.key_cache.device.type == device
    prompts = random_prompts(BF16_LENGTHS, seed=11)
    with recorded_logits(engine) as logits:
        outs = engine.generate(prompts, greedy(BF16_NEW_TOKENS))
    equal = agree = steps = 0
    worst = worst_hf = 0.0
    for out, prompt in zip(outs, prompts, strict=True):
        got, what = out.output_token_ids, f"prompt of {len(prompt)} on {device}"
        rows = torch.stack(logits[out.request_id])
        assert rows.dtype == torch.bfloat16 and rows.device.type == device
        rows = rows.float().cpu()
        hf16 = causal_logits(bf16_ref, prompt, got)  # transformers' own bf16, teacher-forced on our tokens
        err = float((rows - hf16).abs().max())
        assert err < BF16_TOL, f"{what}: bf16 logits differ from transformers' bf16 by {err:.3f}"
        equal += equal_but_for_near_ties(got, causal_generate(bf16_ref, prompt, BF16_NEW_TOKENS), hf16, TIE, what)
        # against fp32 (same weights before the cast, same device)
        ref32 = causal_logits(fp32, prompt, got)
        top2 = ref32.topk(2, dim=-1).values
        fp32_margin = top2[:, 0] - top2[:, 1]
        first32 = causal_generate(fp32, prompt, 1)[0]
        assert got[0] == first32 or float(fp32_margin[0]) <= FP32_TIE, f"{what}: first token differs from fp32's"
        same = rows.argmax(-1) == ref32.argmax(-1)
        agree, steps = agree + int(same.sum()), steps + same.numel()
        parted = fp32_margin[~same]
        assert (parted <= FP32_TIE).all(), f"{what}: bf16 and fp32 part where fp32's top two are {parted.max():.3f}"
        worst = max(worst, float((rows - ref32).abs().max()))
        worst_hf = max(worst_hf, float((hf16 - ref32).abs().max()))
    assert equal >= len(prompts) // 2, f"only {equal} of {len(prompts)} requests equal bf16 generate's throughout"
    assert agree / steps >= FP32_AGREE, f"greedy picks agree with fp32 on {agree} of {steps} steps"
    assert worst < FP32_TOL, f"bf16 logits are {worst:.3f} from fp32's"
    assert worst < worst_hf + BF16_TOL, f"bf16 logits are {worst:.3f} from fp32's, transformers' bf16 {worst_hf:.3f}"


# ---- 3. encoder-decoder, fp32 ------------------------------------------------------------------------


@on_devices
@pytest.mark.parametrize("arch", ["marian", "bart", "t5"])
def test_seq2seq_greedy_and_beam_equal_generate(arch: str, device: str) -> None:
    pair = build_pair(arch, sharp=True)
    model, reference = pair.model.to(device), pair.reference.to(device)
    config = EngineConfig(max_batch_tokens=256, max_running_requests=16, block_size=4)
    engine = Seq2SeqEngine(model, config, num_blocks=256, native_decode=False)
    assert engine.pool.device.type == device and not engine.runner.native
    verdict = seq2seq_self_check.self_check(engine)
    assert verdict.passed, verdict.reason
    # Teacher-forced on random tokens (random weights often repeat one token, which hides self-attention
    # errors): every step's logits against transformers' forward of that input alone.
    gen = torch.Generator().manual_seed(5)
    probe = random_inputs(6, seed=4)
    teacher = [torch.randint(FIRST_WORD, VOCAB, (10,), generator=gen).tolist() for _ in probe]
    for ids, tokens, rows in zip(probe, teacher, teacher_forced_logits(engine, probe, teacher), strict=True):
        ref = seq2seq_logits(reference, ids, tokens)
        err = float((rows.cpu() - ref).abs().max()) / max(1.0, float(ref.abs().max()))
        assert err < LOGIT_TOL, f"{arch}, input of {len(ids)} on {device}: logits differ by {err:.2e} (relative)"
    inputs = random_inputs(6, seed=1)
    for beams in (1, 4):
        settings = decode_settings(model, GenerationOptions(num_beams=beams))
        done: dict[str, RequestOutput] = {}
        for i, ids in enumerate(inputs[:3]):
            engine.add_request(f"b{beams}-{i}", ids, settings)
        for step in range(500):
            if step == 2:  # the rest join while the first decode (beam 4: 24 seats for 16, some wait)
                for i, ids in enumerate(inputs[3:], start=3):
                    engine.add_request(f"b{beams}-{i}", ids, settings)
            elif step > 2 and not engine.has_unfinished_requests():
                break
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        for i, ids in enumerate(inputs):
            got = done[f"b{beams}-{i}"].output_token_ids
            want = seq2seq_generate(reference, ids, num_beams=beams)
            what = f"{arch} beam {beams}, input of {len(ids)} on {device}"
            assert_tokens(got, want, seq2seq_logits(reference, ids, got), what)
        assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


# ---- 4. classification and extractive QA executors -----------------------------------------------


def load_on(registry: Registry, name: str, device: str, dtype: str) -> LoadedModel:
    """`load_model` as the worker calls it, for a registry entry with another dtype and device."""
    entry = registry.models[name]
    spec = ModelSpec.model_validate({**entry.model_dump(), "dtype": dtype, "device": spec_device(device)})
    loaded = load_model(spec, registry)
    assert loaded.device.type == device and next(loaded.model.parameters()).device.type == device
    return loaded


def spec_device(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def classify(texts: Sequence[str], name: str) -> list[Any]:
    return [request(TaskType.CLASSIFY, ClassifyRequest(text=t, top_k=None), name) for t in texts]


def pipeline_scores(lm: LoadedModel, texts: Sequence[str]) -> list[list[dict[str, Any]]]:
    """transformers' text-classification pipeline on the model's own device (named: transformers 5 would move
    a model to cuda:0 when the device is left unset), every label, best first."""
    classifier = pipeline("text-classification", model=lm.model, tokenizer=lm.tokenizer, top_k=None,
                          device=lm.model.device)  # fmt: skip
    assert lm.model.device.type == lm.device.type
    scores: Any = classifier(list(texts))
    return list(scores)


@on_devices
def test_classification_executor_fp32_and_bf16(demo_models: Path, device: str) -> None:
    registry = Registry.load(demo_models)
    name = "demo-classifier"
    expected = pipeline_scores(load_on(registry, name, device, "float32"), TEXTS)
    for dtype in ("float32", "bfloat16"):
        lm = load_on(registry, name, device, dtype)
        executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=512, max_running_requests=16))
        assert executor.forward.packed, executor.forward.path_reason  # the packing self-check passed
        reqs = classify(TEXTS, name)
        run_executor(executor, reqs)
        clear = 0
        for req, want, text in zip(reqs, expected, TEXTS, strict=True):
            got = req.future.result(timeout=0)
            scores = {s.label: s.score for s in got.scores}
            if dtype == "float32":
                assert [s.label for s in got.scores] == [w["label"] for w in want], text
                for w in want:
                    assert scores[w["label"]] == pytest.approx(w["score"], abs=SCORE_TOLERANCE), text
                continue
            assert max(abs(scores[w["label"]] - w["score"]) for w in want) <= BF16_SCORE_TOL, text
            if want[0]["score"] - want[1]["score"] > CLEAR_MARGIN:
                clear += 1
                assert got.label == want[0]["label"], f"bf16 on {device}: {text!r}"
        assert dtype == "float32" or clear >= len(TEXTS) // 2, f"only {clear} texts with a clear fp32 label"


class _ReferenceOn:
    """A model for `executor_support.reference_qa` (which builds CPU tensors): inputs to the model's device,
    outputs back to the CPU in float32, as that reference's numpy scoring needs."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config

    def __call__(self, **inputs: torch.Tensor) -> Any:
        out = self.model(**{k: v.to(self.model.device) for k, v in inputs.items()})
        return type(out)(start_logits=out.start_logits.float().cpu(), end_logits=out.end_logits.float().cpu())


@on_devices
def test_extractive_qa_executor_fp32_and_bf16(demo_models: Path, device: str) -> None:
    registry = Registry.load(demo_models)
    ref = load_on(registry, "demo-qa", device, "float32")
    ref_lm = LoadedModel(ref.spec, _ReferenceOn(ref.model), ref.tokenizer, ref.device, ref.dtype)
    want = [reference_qa(ref_lm, q, c, 15, False) for q, c in QUESTIONS]
    for dtype in ("float32", "bfloat16"):
        lm = load_on(registry, "demo-qa", device, dtype)
        executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=2048, max_running_requests=8))
        assert executor.forward.packed, executor.forward.path_reason
        reqs = [request(TaskType.QA, QARequest(question=q, context=c, max_answer_len=15), "demo-qa")
                for q, c in QUESTIONS]  # fmt: skip
        run_executor(executor, reqs)
        agree = 0
        for req, expected, (_, context) in zip(reqs, want, QUESTIONS, strict=True):
            got = req.future.result(timeout=0)
            assert got.answer == context[got.start : got.end]
            same = (got.answer, got.start, got.end) == (expected["answer"], expected["start"], expected["end"])
            if dtype == "float32":
                assert same, (got, expected)
                assert got.score == pytest.approx(expected["score"], abs=SCORE_TOLERANCE)
            agree += same
        assert agree >= len(QUESTIONS) - 1, f"{dtype} on {device}: {agree} of {len(QUESTIONS)} answers as fp32's"


# ---- 5. loaded through the registry, dtype "auto" ---------------------------------------------------


def auto_dtype(device: str) -> torch.dtype:
    """What registry.py documents for `dtype = "auto"`."""
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@on_devices
def test_auto_dtype_resolves_per_device(demo_models: Path, device: str) -> None:
    spec = ModelSpec(task=TaskType.CLASSIFY, source="x", dtype="auto")
    assert resolve_dtype(spec, torch.device(spec_device(device))) == auto_dtype(device)
    lm = load_on(Registry.load(demo_models), "demo-classifier", device, "auto")
    assert lm.dtype == auto_dtype(device) and next(lm.model.parameters()).dtype == auto_dtype(device)


@on_devices
def test_the_worker_loads_every_demo_model(demo_models: Path, tmp_path: Path, device: str) -> None:
    """`runtime.load_executors`, the worker's start-up, with every demo model at dtype auto on the device (as
    PAGEDQ_DEVICE names it): none refused (a load-time self-check that fails or raises refuses its model), and
    each on its fast path."""
    path = demo_registry_copy(demo_models, tmp_path, lambda text: text.replace('dtype = "float32"', 'dtype = "auto"'))
    registry = Registry.load(path)
    assert {spec.dtype for spec in registry.models.values()} == {"auto"}
    executors, refused = load_executors(registry, spec_device(device), EngineConfig(max_running_requests=8))
    assert refused == {}, refused
    assert {name: executor.stats().path for name, executor in executors.items()} == {
        "demo-classifier": "packed", "demo-multilabel": "packed", "demo-qa": "packed",
        "demo-translator": "paged", "demo-llm": "paged",
    }  # fmt: skip
    for executor in executors.values():
        assert executor.loaded.device.type == device and executor.loaded.dtype == auto_dtype(device)


@on_devices
def test_registry_classifier_auto(demo_models: Path, device: str) -> None:
    registry = Registry.load(demo_models)
    lm, ref = (load_on(registry, "demo-classifier", device, "auto") for _ in range(2))
    executor = make_executor(lm, EngineConfig())
    assert isinstance(executor, ClassificationExecutor)
    assert executor.stats().path == "packed", executor.stats().path_reason  # the self-check accepted packing
    reqs = classify(TEXTS, "demo-classifier")
    run_executor(executor, reqs)
    tolerance = SCORE_TOLERANCE if lm.dtype == torch.float32 else BF16_SCORE_TOL
    for req, want, text in zip(reqs, pipeline_scores(ref, TEXTS), TEXTS, strict=True):
        got = req.future.result(timeout=0)
        scores = {s.label: s.score for s in got.scores}
        assert max(abs(scores[w["label"]] - w["score"]) for w in want) <= tolerance, text
        if lm.dtype == torch.float32 or want[0]["score"] - want[1]["score"] > CLEAR_MARGIN:
            assert got.label == want[0]["label"], text


@on_devices
def test_registry_translator_auto(demo_models: Path, device: str) -> None:
    registry = Registry.load(demo_models)
    lm, ref = (load_on(registry, "demo-translator", device, "auto") for _ in range(2))
    executor = make_executor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=16))
    assert isinstance(executor, Seq2SeqExecutor)
    assert executor.engine is not None, executor.path_reason  # paged: the self-check passed
    assert executor.stats().path == "paged" and executor.engine.pool.device.type == device
    tokens: dict[str, list[int]] = {}
    finish = executor._finish

    def recording(req: Any, encoded: Any, out: list[int], reason: Any) -> None:
        tokens[req.id] = list(out)
        finish(req, encoded, out, reason)

    executor._finish = recording  # type: ignore[method-assign]
    texts = TEXTS[:5]
    reqs = [request(TaskType.TRANSLATE, TranslateRequest(text=t, source_lang="en", target_lang="de"),
                    "demo-translator") for t in texts]  # fmt: skip
    run_executor(executor, reqs)
    equal = 0
    for req, text in zip(reqs, texts, strict=True):
        assert req.future.result(timeout=0).translation is not None
        ids = ref.tokenizer(text)["input_ids"]
        want = seq2seq_generate(ref.model, ids)
        while want and want[-1] == ref.tokenizer.pad_token_id:
            want.pop()
        got, what = tokens[req.id], f"{text!r} on {device} in {lm.dtype}"
        logits = seq2seq_logits(ref.model, ids, got)
        if lm.dtype == torch.float32:
            assert_tokens(got, want, logits, what)
            equal += 1
        else:
            tie = HALF_TIE * max(1.0, float(logits.abs().max()))
            equal += equal_but_for_near_ties(got, want, logits, tie, what)
    assert equal >= len(texts) // 2 + 1, f"{equal} of {len(texts)} translations equal generate's"


@on_devices
def test_registry_causal_lm_auto(demo_models: Path, device: str) -> None:
    """The generative QA model's answers (its prompt template and stop strings). Its executor is built
    without the load-time probe: `test_the_worker_loads_every_demo_model` and `test_decoder_only_self_check_accepts`
    hold the probe, and its failing must not hide whether the answers are right."""
    registry = Registry.load(demo_models)
    lm, ref = (load_on(registry, "demo-llm", device, "auto") for _ in range(2))
    executor = GenerativeExecutor(lm, EngineConfig(max_batch_tokens=256, max_running_requests=8), self_check=False)
    assert executor.engine.cache.key_cache.device.type == device
    outputs: dict[str, tuple[list[int], list[int]]] = {}
    result = executor._result

    def recording(req: Any, prompt: Any, out: RequestOutput) -> Any:
        outputs[req.id] = (list(prompt.token_ids), list(out.output_token_ids))
        return result(req, prompt, out)

    executor._result = recording  # type: ignore[method-assign]
    reqs = [request(TaskType.QA, QARequest(question=q, context=c, generation=GenerationOptions(max_new_tokens=12)),
                    "demo-llm") for q, c in QUESTIONS[:3]]  # fmt: skip
    run_executor(executor, reqs)
    equal = 0
    for req in reqs:
        assert req.future.result(timeout=0).mode == "generative"
        prompt, got = outputs[req.id]
        # generate for as many tokens as the engine made (a stop string may end it before the limit)
        want = causal_generate(ref.model, prompt, len(got))
        logits, what = causal_logits(ref.model, prompt, got), f"{req.id} on {device} in {lm.dtype}"
        if lm.dtype == torch.float32:
            assert_tokens(got, want, logits, what)
            equal += 1
        else:
            equal += equal_but_for_near_ties(got, want, logits, HALF_TIE * max(1.0, float(logits.abs().max())), what)
    assert equal >= 2, f"{equal} of {len(reqs)} answers equal generate's"


# ---- 6. int8 is CPU only ---------------------------------------------------------------------------------


@on_devices
def test_int8_is_cpu_only(demo_models: Path, device: str) -> None:
    registry = Registry.load(demo_models)
    entry = registry.models["demo-classifier"].model_dump()
    if device == "cpu":
        spec = ModelSpec.model_validate({**entry, "dtype": "int8", "device": "cpu"})
        loaded = load_model(spec, registry)
        assert loaded.dtype == torch.float32 and quantization_summary(loaded.model) is not None
        return
    with pytest.raises(pydantic.ValidationError, match="CPU only"):
        ModelSpec.model_validate({**entry, "dtype": "int8", "device": "cuda:0"})
    spec = ModelSpec.model_validate({**entry, "dtype": "int8"})  # no device: the worker's PAGEDQ_DEVICE decides
    with pytest.raises(ValueError, match="CPU only"):
        load_model(spec, registry, "cuda:0")
