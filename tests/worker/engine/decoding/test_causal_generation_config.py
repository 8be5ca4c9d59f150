"""A causal LM's generation_config on the paged engine: honoured exactly as `model.generate` applies it, or refused.

Greedy runs with each honoured processor (and a Qwen-like combination) go through the engine batched -- prompts
of different lengths, chunked prefill -- and must equal `generate(do_sample=False)` on each prompt alone, token for
token. Sampling cannot be compared token for token (the RNG is consumed differently), so the distribution the
sampler draws from is compared with generate's own processed scores (`output_scores`) on the same raw logits
(`output_logits`), step by step. The model is a sharpened tiny Qwen2 whose LM head is scaled so its logits spread
like a trained model's (std ~3) and the filters have something to cut, and leans towards its input embeddings so
that, like a real LM without a penalty, it repeats itself: the penalties and bans change its output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from pagedq.shared.errors import InvalidRequest
from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.core.request import TokenSequence
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoder_only.self_check import UnsupportedModel
from pagedq.worker.engine.decoding import causal_options as causal_generation
from pagedq.worker.engine.decoding.causal_options import (
    HONOURED,
    NO_EFFECT_ON_TOKENS,
    REFUSED_WHEN_SET,
    REQUEST_OPTIONS,
    sampling_params,
)
from pagedq.worker.engine.decoding.logits_processors import ProcessorSettings
from pagedq.worker.engine.decoding.sampling import SamplingParams, apply_processors, sampling_probs
from worker.engine.families import build_family
from worker.engine.helpers import TinyModel, one_torch_thread, random_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")
assert one_torch_thread

MAX_NEW = 10
LM_HEAD_SCALE = 20.0  # logits std ~3, like a trained model's
ECHO = 0.05  # how much of each token's (unit) input embedding its LM-head row gets: the model likes to repeat


@pytest.fixture(scope="module")
def tm() -> TinyModel:
    tm = build_family("qwen2", seed=4)
    for model in (tm.model, tm.reference):
        embed = model.get_input_embeddings().weight.data
        head = model.lm_head.weight.data
        head.copy_(LM_HEAD_SCALE * (head + ECHO * embed / embed.norm(dim=-1, keepdim=True)))
    return tm


def prompts() -> list[list[int]]:
    """Four lengths, including a one-token prompt (forced BOS) and prompts that repeat themselves (n-grams)."""
    a, b, c = random_prompts([6, 4, 9], seed=5)
    return [[213], a, b * 3, c + c[:5]]


@pytest.fixture
def configured(tm: TinyModel) -> Iterator[Any]:
    """Sets the same generation_config on the engine's model and the reference; restores the plain one."""
    saved = tm.model.generation_config, tm.reference.generation_config

    def configure(**fields: Any) -> None:
        for model in (tm.model, tm.reference):
            model.generation_config = GenerationConfig(pad_token_id=0, **fields)

    yield configure
    tm.model.generation_config, tm.reference.generation_config = saved


def reference(tm: TinyModel, prompt: list[int], **kwargs: Any) -> list[int]:
    with torch.no_grad():
        out = tm.reference.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, **kwargs)
    return out[0, len(prompt) :].tolist()


def engine_greedy(tm: TinyModel, options: GenerationOptions | None = None) -> list[list[int]]:
    """Every prompt at once through a fresh engine (self-check on), options resolved as the executor does."""
    engine = LLMEngine(tm.model, config=EngineConfig(block_size=4, max_batch_tokens=16), num_blocks=64)
    options = options or GenerationOptions(max_new_tokens=MAX_NEW)
    params = sampling_params(tm.model, options, sorted(engine.stop_checker.eos_token_ids))
    assert params.greedy
    return [out.output_token_ids for out in engine.generate(prompts(), params)]


@pytest.fixture(scope="module")
def baseline(tm: TinyModel) -> list[list[int]]:
    """Greedy continuations without any processor (to pick tokens the processors then act on)."""
    return [reference(tm, p, do_sample=False) for p in prompts()]


def greedy_cases(base: list[list[int]]) -> dict[str, dict[str, Any]]:
    p = prompts()
    eos = base[1][2]
    return {
        "repetition_penalty": {"repetition_penalty": 1.5},
        "repetition_bonus": {"repetition_penalty": 0.6},
        "no_repeat_ngram_1": {"no_repeat_ngram_size": 1},
        "no_repeat_ngram_2": {"no_repeat_ngram_size": 2, "repetition_penalty": 0.6},
        "bad_words": {"bad_words_ids": [[base[0][2]], [base[1][3], base[1][4]], [p[2][-1], base[2][0]]]},
        "min_new_tokens": {"eos_token_id": eos, "min_new_tokens": 5},
        "min_length": {"eos_token_id": [eos, base[3][1]], "min_length": 17},  # prompt included: 1, 6, 12, 14
        "min_new_tokens_replaces_min_length": {"eos_token_id": eos, "min_length": 40, "min_new_tokens": 3},
        "suppress_tokens": {"suppress_tokens": [base[0][0], base[2][3], base[3][5]]},
        "begin_suppress_tokens": {"begin_suppress_tokens": [b[0] for b in base]},
        "forced_bos": {"forced_bos_token_id": 7, "begin_suppress_tokens": [base[1][0]]},
        "forced_eos": {"eos_token_id": 5, "forced_eos_token_id": 5},
        "qwen_like": {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1},
        "everything": {
            "repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "bad_words_ids": [[base[1][1]]],
            "eos_token_id": eos, "min_new_tokens": 4, "suppress_tokens": [base[3][0]], "min_p": 0.2,
        },
    }  # fmt: skip


@pytest.mark.parametrize("case", list(greedy_cases([[0] * MAX_NEW] * 4)))
def test_greedy_with_generation_config_processors_matches_generate(
    tm: TinyModel, baseline: list[list[int]], configured: Any, case: str
) -> None:
    fields = greedy_cases(baseline)[case]
    configured(max_new_tokens=MAX_NEW, **fields)
    got = engine_greedy(tm, GenerationOptions(do_sample=False))  # the request overrides a sampling default
    want = [reference(tm, p, do_sample=False) for p in prompts()]
    assert got == want
    configured(max_new_tokens=MAX_NEW, **{k: v for k, v in fields.items() if k == "eos_token_id"})
    plain = [reference(tm, p, do_sample=False) for p in prompts()]
    assert want != plain, f"{case} changes nothing here: the test would prove nothing"


def test_min_new_tokens_is_in_new_tokens_and_eos_still_stops(
    tm: TinyModel, baseline: list[list[int]], configured: Any
) -> None:
    eos = baseline[1][2]
    configured(eos_token_id=eos, min_new_tokens=2)
    assert engine_greedy(tm)[1] == baseline[1][:3], "EOS allowed from the third token on: it stops there"


def test_an_eos_forced_at_the_limit_finishes_by_length(tm: TinyModel, configured: Any) -> None:
    configured(eos_token_id=5, forced_eos_token_id=5)
    engine = LLMEngine(tm.model, config=EngineConfig(block_size=4), num_blocks=64)
    params = sampling_params(tm.model, GenerationOptions(max_new_tokens=4), [5])
    outs = engine.generate(prompts(), params)
    assert all(o.output_token_ids[-1] == 5 and o.finish_reason == "length" for o in outs)


# ---- beam search ------------------------------------------------------------------------------------------------

BEAM_CASES: dict[str, dict[str, Any]] = {
    "beams_4": {"num_beams": 4},
    "beams_3_eos": {"num_beams": 3, "eos": True},  # hypotheses finish at different lengths
    "length_penalty_2_early": {"num_beams": 4, "eos": True, "length_penalty": 2.0, "early_stopping": True},
    "length_penalty_-1_never": {"num_beams": 2, "eos": True, "length_penalty": -1.0, "early_stopping": "never"},
    "beams_with_processors": {"num_beams": 4, "eos": True, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3,
                              "min_new_tokens": 3},
}  # fmt: skip


@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_matches_generate(tm: TinyModel, baseline: list[list[int]], configured: Any, case: str) -> None:
    """Beam requests batched with each other and with a greedy one, prompts chunked over steps, equal
    `generate(num_beams=...)` on each prompt alone, token for token; the generation_config's length penalty,
    early stopping and processors apply (the request sets num_beams)."""
    fields = dict(BEAM_CASES[case])
    beams = fields.pop("num_beams")
    if fields.pop("eos", False):
        fields["eos_token_id"] = baseline[1][2]
    configured(**fields)
    engine = LLMEngine(tm.model, config=EngineConfig(block_size=4, max_batch_tokens=16), num_blocks=128)
    eos = sorted(engine.stop_checker.eos_token_ids)
    beam = sampling_params(tm.model, GenerationOptions(max_new_tokens=MAX_NEW, num_beams=beams), eos)
    greedy = sampling_params(tm.model, GenerationOptions(max_new_tokens=MAX_NEW), eos)
    assert beam.num_beams == beams and beam.length_penalty == fields.get("length_penalty", 1.0)
    outs = engine.generate([*prompts(), prompts()[1]], [beam] * len(prompts()) + [greedy])
    want = [reference(tm, p, do_sample=False, num_beams=beams) for p in prompts()]
    assert [o.output_token_ids for o in outs[:-1]] == want
    assert outs[-1].output_token_ids == reference(tm, prompts()[1], do_sample=False)
    assert want != [reference(tm, p, do_sample=False) for p in prompts()], "beams change nothing here"
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks, "every beam's blocks are back"
    for out, tokens in zip(outs, want, strict=False):
        ended = bool(tokens) and tokens[-1] in eos and len(tokens) <= MAX_NEW
        assert out.finish_reason == ("stop" if ended else "length")


def test_beam_search_survives_preemption(tm: TinyModel, baseline: list[list[int]], configured: Any) -> None:
    """A pool too small for every beam at once: beam requests are preempted (every beam's blocks freed) and
    recomputed, and still equal generate."""
    configured(eos_token_id=baseline[1][2])
    engine = LLMEngine(tm.model, config=EngineConfig(block_size=4, max_batch_tokens=64), num_blocks=40)
    params = sampling_params(tm.model, GenerationOptions(max_new_tokens=MAX_NEW, num_beams=4), [baseline[1][2]])
    outs = engine.generate(prompts(), params)
    assert engine.scheduler.num_preemptions > 0, "the pool was big enough: nothing was preempted"
    assert [o.output_token_ids for o in outs] == [reference(tm, p, do_sample=False, num_beams=4) for p in prompts()]
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


def test_beam_requests_stream_their_tokens_when_they_end(tm: TinyModel, configured: Any) -> None:
    configured()
    engine = LLMEngine(tm.model, config=EngineConfig(block_size=4), num_blocks=128)
    streamed: list[int] = []
    params = sampling_params(tm.model, GenerationOptions(max_new_tokens=MAX_NEW, num_beams=3), [])
    engine.add_request("b", prompts()[2], params, on_token=lambda _rid, token: streamed.append(token))
    outs: list[Any] = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.request_id == "b")
        assert streamed == [] or outs[-1].finished, "beams are candidates, never streamed while they run"
    assert outs[-1].finished and streamed == outs[-1].output_token_ids


SAMPLING_CASES: dict[str, dict[str, Any]] = {
    "qwen_like": {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1},
    "min_p": {"temperature": 1.3, "min_p": 0.1},
    "typical_p": {"typical_p": 0.7, "top_k": 0},
    "epsilon_cutoff": {"epsilon_cutoff": 3e-3, "top_k": 0},
    "eta_cutoff": {"eta_cutoff": 3e-2, "top_k": 0},
    "processors_then_warpers": {
        "no_repeat_ngram_size": 2,
        "repetition_penalty": 1.3,
        "eos_token_id": 4,
        "min_new_tokens": 3,
        "suppress_tokens": [9, 10],
        "top_k": 30,
        "top_p": 0.9,
        "temperature": 0.8,
    },  # fmt: skip
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_distribution_matches_generate_processors_and_warpers(
    tm: TinyModel, configured: Any, case: str
) -> None:
    configured(do_sample=True, **SAMPLING_CASES[case])
    params = sampling_params(tm.model, GenerationOptions(max_new_tokens=6), causal_generation_eos(tm))
    assert not params.greedy
    for prompt in prompts()[1:]:
        torch.manual_seed(0)
        with torch.no_grad():
            out = tm.reference.generate(
                torch.tensor([prompt]), max_new_tokens=6, output_logits=True, output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        generated = out.sequences[0, len(prompt) :].tolist()
        request = TokenSequence("r", prompt, params)
        for step, (raw, scores) in enumerate(zip(out.logits, out.scores, strict=True)):
            got = sampling_probs(apply_processors(raw.clone(), [request])[0], params)
            want = scores[0].softmax(-1)
            assert float((got - want).abs().max()) <= 1e-5, f"step {step}"
            assert bool(((got > 0) == (want > 0)).all()), "the same tokens are cut"
            request.append_output(generated[step])
        kept = int((want > 0).sum())
    assert kept < want.numel(), "the filters cut something"


def causal_generation_eos(tm: TinyModel) -> list[int]:
    eos = tm.model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def test_processors_apply_to_a_float32_copy_and_leave_inactive_batches_alone() -> None:
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5]], dtype=torch.bfloat16)
    plain = TokenSequence("plain", [0, 1], SamplingParams())
    assert apply_processors(logits, [plain]) is logits
    penalised = TokenSequence("p", [0, 1], SamplingParams(processors=ProcessorSettings(repetition_penalty=2.0)))
    out = apply_processors(logits, [penalised])
    assert out.dtype == torch.float32 and logits[0, 0] == 1.0
    assert out[0].tolist() == [0.5, -4.0, 3.0, 0.5]


# ---- refused ----------------------------------------------------------------------------------------------------


def test_every_generation_config_field_is_honoured_without_effect_or_refused() -> None:
    """A field transformers adds to GenerationConfig fails here until it is sorted in causal_generation.py."""
    fields = set(GenerationConfig().to_dict())
    tables = [set(HONOURED), set(NO_EFFECT_ON_TOKENS), set(REFUSED_WHEN_SET)]
    unsorted = fields - set().union(*tables)
    assert not unsorted, f"sort {sorted(unsorted)} in worker/engine/decoding/causal_options.py"
    for i, a in enumerate(tables):
        for b in tables[i + 1 :]:
            assert not a & b, f"{sorted(a & b)} are in two tables"


def test_every_request_option_has_a_path() -> None:
    assert set(GenerationOptions.model_fields) == set(REQUEST_OPTIONS)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"sequence_bias": {(5,): -1.0}}, "sequence_bias={(5,): -1.0}"),
        ({"num_beams": 4, "do_sample": True}, "num_beams=4 with do_sample=True (beam sampling)"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha=0.6"),
        ({"exponential_decay_length_penalty": (4, 1.5)}, "exponential_decay_length_penalty=(4, 1.5)"),
        ({"stop_strings": ["\n"]}, "stop_strings=['\\n']"),
        ({"forced_eos_token_id": [3, 4]}, "forced_eos_token_id=[3, 4]"),
        ({"encoder_repetition_penalty": 1.2}, "encoder_repetition_penalty=1.2"),
    ],
)
def test_a_model_whose_generation_config_sets_an_unsupported_field_is_refused_at_load(
    tm: TinyModel, configured: Any, fields: dict[str, Any], named: str
) -> None:
    configured(**fields)
    with pytest.raises(UnsupportedModel, match="generation_config.json") as refused:
        LLMEngine(tm.model, config=EngineConfig(block_size=4), num_blocks=16)
    assert named in str(refused.value)


def test_fields_at_their_defaults_are_not_refused(tm: TinyModel, configured: Any) -> None:
    configured(num_beams=1, num_return_sequences=1, guidance_scale=1.0, encoder_repetition_penalty=1.0,
               remove_invalid_values=False, renormalize_logits=True, length_penalty=2.0)  # fmt: skip
    LLMEngine(tm.model, config=EngineConfig(block_size=4), num_blocks=16)


def test_a_request_option_that_is_not_supported_fails_with_invalid_request(
    tm: TinyModel, configured: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured(do_sample=True)  # the request's beams over the model's sampling default: beam sampling
    with pytest.raises(InvalidRequest, match="beam sampling"):
        sampling_params(tm.model, GenerationOptions(num_beams=2), [])
    assert sampling_params(tm.model, GenerationOptions(num_beams=2, do_sample=False), []).num_beams == 2
    configured()
    monkeypatch.delitem(REQUEST_OPTIONS, "top_k")
    with pytest.raises(InvalidRequest, match="top_k"):
        sampling_params(tm.model, GenerationOptions(do_sample=True, top_k=5), [])
    sampling_params(tm.model, GenerationOptions(do_sample=True), [])  # left at its default: nothing to refuse


def test_unset_sampling_knobs_are_the_models_then_generates_defaults(tm: TinyModel, configured: Any) -> None:
    configured(do_sample=True, temperature=0.7)
    params = sampling_params(tm.model, GenerationOptions(), [])
    assert (params.temperature, params.top_k, params.top_p) == (0.7, 50, 1.0), "generate's top_k default"
    params = sampling_params(tm.model, GenerationOptions(do_sample=True, top_k=0, temperature=1.2), [])
    assert (params.temperature, params.top_k) == (1.2, 0)
    params = sampling_params(tm.model, GenerationOptions(do_sample=False), [])
    assert params.greedy and dataclasses.replace(params, processors=ProcessorSettings()) == SamplingParams(
        max_new_tokens=causal_generation.DEFAULT_MAX_NEW_TOKENS
    )
