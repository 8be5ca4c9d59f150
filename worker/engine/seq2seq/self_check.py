"""Load-time self-check: the paged seq2seq path against the model's own forward, before the worker serves.

`self_check(engine)` runs when the executor builds the engine:

1. `PROBE_LENGTHS` source sentences (fixed pseudo-random ids, no special tokens but a final EOS) go through
   the engine together -- one packed encoder pass, then `PROBE_STEPS` decoder steps with every sentence in
   each packed pass -- and the logits of every step are recorded (`Seq2SeqEngine.observe_logits`). The
   steps sample (seeded, temperature 1) rather than take the argmax: random or untrained weights often
   repeat one token, and a decoder fed the same token at every position cannot tell a wrong self-attention
   (T5's relative positions, say) from a right one;
2. each sentence then runs alone through the model as loaded (its own attention implementation, no hooks):
   one teacher-forced forward over the tokens the engine chose (with a cache that rounds its K/V as the
   engine's pages do, where they store a narrower dtype: `paged.kv_dtype`);
3. it passes when, at every step, the engine's greedy token (its argmax) is the forward's (or within the
   tolerance of it: a near tie may go either way) and no logit differs by more than
   `RELATIVE_TOLERANCE[dtype] * max(1, max |logit|)`.

Anything else -- a wrong token, a distance past the tolerance, an exception -- fails the check with a
reason; the executor then serves the model on the batched-`generate` fallback. Deterministic: the same
model gives the same probe, the same steps and the same verdict.

Cost (measured on this repository's shared 2-core AVX2 CPU, one torch thread, fp32, `self_check` alone):
the 2+2-layer d_model-64 test models 20-90 ms; the demo translator (0.3M params) 55 ms; an OPUS-MT-shaped
Marian (6+6 x 512, vocab 58101, 74M params) 0.53 s warm, 0.71 s on the first call. bf16 test models
30-50 ms. The engine's counters are reset afterwards, so its stats count real requests only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pagedq.worker.engine.core.hf_compat import cache_kwargs
from pagedq.worker.engine.cpu.quantization import check_dtype
from pagedq.worker.engine.decoding.seq2seq_options import DecodeSettings
from pagedq.worker.engine.paged.kv_dtype import reference_cache
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine

PROBE_LENGTHS = (5, 13, 29)  # source tokens, EOS included; capped by the model's positions
PROBE_STEPS = 4  # greedy decoder steps after the start token
PROBE_SEED = 0
#: logits may differ by this fraction of max(1, max |logit|): fp32 accumulation order only; half precision
#: rounds every activation to 8 (bf16) or 11 (fp16) bits, so two orders of the same sums drift further
RELATIVE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass(frozen=True)
class SelfCheck:
    """The verdict: `reason` is empty when the paged path matched the model's own forward."""

    reason: str
    max_logit_error: float
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.reason


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _start_token(model: Any) -> int:
    for config in (model.generation_config, model.config):
        for name in ("decoder_start_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
    return 0


def probe_inputs(model: Any) -> list[list[int]]:
    """The probe's source sentences: ids drawn with a fixed seed from the vocabulary minus special tokens."""
    config = model.config
    specials = {t for name in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id",
                               "unk_token_id") for t in _ids(getattr(config, name, None))}  # fmt: skip
    allowed = torch.ones(config.vocab_size, dtype=torch.bool)
    allowed[[t for t in specials if 0 <= t < config.vocab_size]] = False
    words = allowed.nonzero().flatten()
    eos = _ids(config.eos_token_id)[:1]
    positions = getattr(config, "max_position_embeddings", None) or max(PROBE_LENGTHS)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    inputs = []
    for length in PROBE_LENGTHS:
        n = max(1, min(length, positions - 2) - len(eos))
        picks = torch.randint(0, words.shape[0], (n,), generator=gen)
        inputs.append(words[picks].tolist() + eos)
    return inputs


def self_check(engine: Seq2SeqEngine) -> SelfCheck:
    """Probe the paged path against the model's own forward (module docstring); never raises."""
    began = time.perf_counter()
    try:
        reason, error = _probe(engine)
    except Exception as exc:  # noqa: BLE001 - any failure of the paged path is a verdict, not a crash
        reason, error = f"the probe raised {type(exc).__name__}: {exc}", float("inf")
    finally:
        engine.observe_logits = None
        engine.reset_counters()
    return SelfCheck(reason, error, time.perf_counter() - began)


def _probe(engine: Seq2SeqEngine) -> tuple[str, float]:
    model = engine.model
    inputs = probe_inputs(model)
    start = _start_token(model)
    steps: dict[str, list[torch.Tensor]] = {}

    def observe(requests: Sequence[Any], logits: torch.Tensor) -> None:
        row = 0
        for request in requests:
            steps.setdefault(request.request_id, []).append(logits[row].clone())
            row += len(request.sequences)

    engine.observe_logits = observe
    settings = DecodeSettings(
        max_new_tokens=PROBE_STEPS, decoder_start_token_id=start, do_sample=True, seed=PROBE_SEED, top_k=0
    )
    outputs = engine.generate(inputs, settings)
    engine.observe_logits = None
    tolerance = RELATIVE_TOLERANCE.get(check_dtype(model), RELATIVE_TOLERANCE[torch.bfloat16])
    worst = 0.0
    with engine.runner.original_attention_implementation(), torch.inference_mode():
        for ids, out in zip(inputs, outputs, strict=True):
            tokens = out.output_token_ids
            decoder_ids = torch.tensor([[start, *tokens[:-1]]], device=engine.pool.device)
            encoder_ids = torch.tensor([ids], device=engine.pool.device)
            cache = reference_cache(model, engine.pool)
            kwargs = cache_kwargs(model, cache)
            forward = model(input_ids=encoder_ids, decoder_input_ids=decoder_ids, use_cache=cache is not None, **kwargs)
            reference = forward.logits[0].float()
            paged = torch.stack(steps[out.request_id])
            if paged.shape != reference.shape:
                return f"{paged.shape[0]} paged steps for {reference.shape[0]} decoder tokens", float("inf")
            scale = tolerance * max(1.0, float(reference.abs().max()))
            error = float((paged - reference).abs().max())
            worst = max(worst, error)
            for step, token in enumerate(paged.argmax(-1).tolist()):
                best = int(reference[step].argmax())
                if token != best and float(reference[step, best] - reference[step, token]) > scale:
                    return (
                        f"a probe sentence of {len(ids)} tokens, step {step}: the paged path's greedy token is "
                        f"{token}, the model's own forward's {best}"
                    ), worst
            if error > scale:
                return f"paged logits differ from the model's own forward by {error:.3g} (tolerance {scale:.3g})", worst
    return "", worst
