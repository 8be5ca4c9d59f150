"""Exact or refused: what the paged decoder engine checks before it serves a causal LM.

Two gates, both when an `LLMEngine` is built (before a worker consumes anything):

1. `check_rotary` (static, free): rotary embeddings whose frequencies depend on the longest position in
   the forward -- LongRoPE (Phi-3/3.5 128k: short or long factors) and dynamic NTK -- would rotate a
   short request with long-request frequencies whenever the two share a packed step. Refused unless
   `max_model_len` keeps every request under the switch point (then the frequencies never change).
2. `self_check` (a probe): `PROBE_LENGTHS` prompts (plus one just past a rotary threshold the config
   names, `original_max_position_embeddings`, when that is at most `PROBE_MAX_THRESHOLD` tokens)
   go through the engine itself -- packed, chunked by its own budget, prefill then decode steps to
   `PROBE_NEW_TOKENS` greedy tokens (decode rows through the native kernel where the engine uses it) --
   and each request's logits are compared with the model's own eager forward on that request alone
   (batch of one, no cache, `attn_implementation="eager"`, the reference semantics of soft-capping and
   sinks). Tolerance: max |logit difference| <= `LOGIT_TOLERANCE[dtype]` * max(1, max |reference logit|);
   a greedy token may differ from the reference's only where the reference's own top two are within
   that tolerance (a tie). Beyond it, or when the probe raises (a keyword paged attention cannot honour,
   a cache call it cannot serve), `UnsupportedModel` with the reason.

The probe is deterministic: fixed token ids (a seeded generator), greedy sampling, no randomness
elsewhere. Cost: 4 engine steps over 41 prompt tokens plus three eager forwards of 8-26 tokens (only the
last 4 positions through the LM head). Measured on the shared 2-core AVX2 development CPU, fp32, one
torch thread, while others ran on it: 12-19 ms for the 2-layer x 64 test models (Llama, Gemma-2,
GPT-OSS), ~0.8 s for a 135M Llama shape (SmolLM-135M: 30 layers x 576, vocab 49k); it scales like
~100 tokens of forward, i.e. 200 x params FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pagedq.worker.engine.core.hf_compat import cache_kwargs
from pagedq.worker.engine.cpu.quantization import check_dtype
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.paged.kv_dtype import reference_cache

if TYPE_CHECKING:
    from pagedq.worker.engine.decoder_only.engine import LLMEngine

PROBE_LENGTHS = (5, 13, 23)
PROBE_NEW_TOKENS = 4  # greedy tokens per probe: one from the prefill, three from decode steps
PROBE_MAX_THRESHOLD = 1024  # a rotary threshold further out is not probed (too slow on a real model)
PROBE_SEED = 20240607
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # relative to max(1, max |reference logit|)
HALF_TOLERANCE = 6e-2  # bf16 / fp16: 8 (11) mantissa bits, compounded over the layers
STEP_DEPENDENT_ROPE = ("longrope", "dynamic")


class UnsupportedModel(ValueError):
    """The paged engine refuses this model: it would not produce transformers' output. `str()` says why."""


def check_rotary(model: Any, max_model_len: int | None) -> None:
    """Refuse rotary embeddings that change with the step's longest position (see the module docstring)."""
    for params in _rope_parameters(model.config.get_text_config()):
        kind = params.get("rope_type") or params.get("type")
        if kind not in STEP_DEPENDENT_ROPE:
            continue
        switch = params.get("original_max_position_embeddings") or getattr(
            model.config.get_text_config(), "original_max_position_embeddings", None
        )
        if switch is not None and max_model_len is not None and max_model_len <= switch:
            continue  # every request stays under the switch point: the frequencies never change
        raise UnsupportedModel(
            f"{type(model).__name__} uses {kind} rotary scaling, which picks its frequencies from the longest "
            f"position in a forward: requests sharing a packed step would change each other's output "
            f"(serve it with max_model_len <= {switch} to keep the short factors)"
        )


def rotary_threshold(model: Any) -> int | None:
    """The position where the config says its rotary scaling starts (`original_max_position_embeddings`)."""
    text = model.config.get_text_config()
    found = [p.get("original_max_position_embeddings") for p in _rope_parameters(text)]
    found.append(getattr(text, "original_max_position_embeddings", None))
    values = [v for v in found if isinstance(v, int)]
    return min(values) if values else None


def _rope_parameters(config: Any) -> list[dict]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    nested = [v for v in params.values() if isinstance(v, dict)]  # per layer type (Gemma-3)
    return nested or [params]


@dataclass
class ProbeResult:
    """What the probe measured, for the log and for tests."""

    max_logit_error: float  # relative, as compared against the tolerance
    tolerance: float
    prompt_lengths: list[int]


def self_check(engine: LLMEngine) -> ProbeResult:
    """Run the probe through `engine`; raise `UnsupportedModel` beyond tolerance. Leaves the engine as
    it was (no requests, prefix cache and counters reset)."""
    model = engine.model
    lengths = _probe_lengths(engine)
    prompts = _probe_prompts(model, lengths)
    ids = [f"pagedq-self-check-{i}" for i in range(len(prompts))]
    try:
        engine_logits, tokens = _run_paged(engine, ids, prompts)
    except UnsupportedModel:
        raise
    except Exception as exc:  # anything the paged path cannot serve refuses the model, with its message
        raise UnsupportedModel(f"{type(model).__name__} fails on the paged path: {type(exc).__name__}: {exc}") from exc
    finally:
        engine.reset_after_probe(ids)
    tolerance = LOGIT_TOLERANCE.get(check_dtype(model), HALF_TOLERANCE)
    worst = 0.0
    for i, prompt in enumerate(prompts):
        ref = _eager_logits(model, prompt + tokens[i][:-1], len(tokens[i]), engine.cache)  # [steps, vocab]
        got = engine_logits[i]
        scale = max(1.0, float(ref.abs().max()))
        worst = max(worst, float((got - ref).abs().max()) / scale)
        margin = ref.max(dim=-1).values - ref.gather(1, torch.tensor(tokens[i], device=ref.device)[:, None]).squeeze(1)
        if float(margin.max()) > tolerance * scale:
            step = int(margin.argmax())
            raise UnsupportedModel(
                f"{type(model).__name__} is not exact on the paged path: a {len(prompt)}-token probe's greedy "
                f"token {step} differs from the model's own forward (logit margin {float(margin.max()):.3g})"
            )
    if worst > tolerance:
        raise UnsupportedModel(
            f"{type(model).__name__} is not exact on the paged path: probe logits differ from the model's own "
            f"forward by {worst:.3g} (relative; tolerance {tolerance:g})"
        )
    return ProbeResult(worst, tolerance, lengths)


def _probe_lengths(engine: LLMEngine) -> list[int]:
    """`PROBE_LENGTHS`, plus one past a near rotary threshold; each within max_model_len and the pool."""
    lengths = list(PROBE_LENGTHS)
    threshold = rotary_threshold(engine.model)
    if threshold is not None and threshold < PROBE_MAX_THRESHOLD:
        lengths.append(threshold + 1)
    room = engine.kv.pool.num_blocks * engine.config.block_size
    if engine.max_model_len is not None:
        room = min(room, engine.max_model_len - 1)
    longest = max(1, room - PROBE_NEW_TOKENS)
    return [min(n, longest) for n in lengths]


def _probe_prompts(model: Any, lengths: list[int]) -> list[list[int]]:
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _run_paged(
    engine: LLMEngine, ids: list[str], prompts: list[list[int]]
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Every probe through the engine together; each one's logits [steps, vocab] and greedy tokens."""
    rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in ids}
    runner, execute = engine.runner, engine.runner.execute

    def recording(out: Any, block_ids: Any) -> tuple[torch.Tensor, list]:
        logits, samplers = execute(out, block_ids)
        for row, seq in zip(logits, samplers, strict=True):
            rows[seq.seq_id].append(row.clone())
        return logits, samplers

    params = SamplingParams(max_new_tokens=PROBE_NEW_TOKENS, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    runner.execute = recording  # type: ignore[method-assign]
    try:
        for rid, prompt in zip(ids, prompts, strict=True):
            engine.add_request(rid, prompt, params)
        while engine.has_unfinished_requests():
            tokens.update((o.request_id, list(o.output_token_ids)) for o in engine.step() if o.finished)
    finally:
        del runner.execute  # back to the class's method
    return [torch.stack(rows[rid]) for rid in ids], [tokens[rid] for rid in ids]


@torch.inference_mode()
def _eager_logits(model: Any, token_ids: list[int], last: int, pages: Any = None) -> torch.Tensor:
    """The model's own forward on one request alone (eager attention, no cache): logits of the `last`
    positions, [last, vocab]. Where the engine's `pages` store a narrower dtype than the model's
    (`kv_cache_dtype`), the forward runs with a cache that rounds its K/V the same way (`paged.kv_dtype`)."""
    paged = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ids = torch.tensor([token_ids], device=model.device)
        cache = reference_cache(model, pages) if pages is not None else None
        out = model(input_ids=ids, use_cache=cache is not None, logits_to_keep=last, **cache_kwargs(model, cache))
        return out.logits[0].float()
    finally:
        model.set_attn_implementation(paged)
