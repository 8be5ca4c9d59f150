"""Sampling parameters and the batched sampler: logits rows -> next token ids.

In generate's order (`GenerationMixin._get_logits_processor`): first the request's logits processors
(`logits_processors`: repetition penalty, n-gram and word bans, minimum length, forced and suppressed
tokens) on a float32 copy of the raw logits of every row that has any -- greedy and sampled alike; then
greedy rows are decided with one `argmax` over all of them (on the logits as the model computed them: for bf16
that is the argmax of their exact fp32 upcast; the native kernel's where built, `native.argmax_rows`), and
sampled rows apply the warpers in fp32 (temperature, top-k, top-p, min-p, typical-p, epsilon and eta
cutoffs) and draw with the request's own `torch.Generator` when it has a seed, so a seeded request gives
the same tokens whatever else shares its batch.

Any positive temperature stays finite: logits are shifted so their maximum is exactly 0 before they are
divided, so a vanishing temperature sends every other logit to -inf (argmax) instead of inf - inf = NaN.
A temperature below `GREEDY_BELOW_TEMPERATURE` is greedy outright (vLLM's `_SAMPLING_EPS` convention).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
)

from pagedq.worker.engine.core.request import RequestStatus, TokenSequence
from pagedq.worker.engine.cpu.native import argmax_rows
from pagedq.worker.engine.decoding.logits_processors import NO_PROCESSORS, ProcessorSettings, Row, process_rows

#: Held by every draw from torch's default (process-wide) generators in the engine: an unseeded request's
#: draw here, and a seeded or sampling `generate` of the seq2seq fallback (which reseeds them in a forked
#: state). The worker steps each model in a thread of its own (`lanes.EngineLanes`), so without it another
#: model's unseeded draw could land between a seeded `generate`'s `manual_seed` and its own draws, and the
#: seeded request would not get the tokens its seed gives.
DEFAULT_GENERATOR_LOCK = threading.Lock()

#: Temperatures below this sample greedily: `exp(-gap / T)` for any logit gap the model can tell apart is 0.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    `temperature == 0` (or below `GREEDY_BELOW_TEMPERATURE`) means greedy. `stop` strings need the engine
    to have a tokenizer. EOS ids come from the engine (model generation config) unless `ignore_eos` is set
    (benchmarks). `processors` apply to greedy and sampled requests; `min_p`, `typical_p`,
    `epsilon_cutoff` and `eta_cutoff` (after top-p, as generate) only when sampling. Each "off" by default."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_p: float = 0.0  # 0.0: off
    typical_p: float = 1.0  # 1.0: off
    epsilon_cutoff: float = 0.0  # 0.0: off
    eta_cutoff: float = 0.0  # 0.0: off
    processors: ProcessorSettings = NO_PROCESSORS
    num_beams: int = 1  # > 1: beam search (greedy only), `decoding.beam_search`
    length_penalty: float = 1.0  # beam search: a finished hypothesis scores sum / length ** length_penalty
    early_stopping: bool | str = False  # beam search: generate's True / False / "never"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and not self.greedy:
            raise ValueError("beam search samples nothing: num_beams > 1 needs temperature 0")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class Sampler:
    """Picks one token per logits row. Rows are in the order of `requests`."""

    def __call__(self, logits: torch.Tensor, requests: Sequence[TokenSequence]) -> list[int]:
        if not requests:
            return []
        logits = apply_processors(logits, requests)
        out = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
        if len(greedy) == len(requests):
            out = argmax_rows(logits)
        else:
            if greedy:
                idx = torch.tensor(greedy, device=logits.device)
                out[idx] = argmax_rows(logits[idx])
            for i, request in enumerate(requests):
                if not request.sampling_params.greedy:
                    out[i] = self._sample_row(logits[i], request)
        return out.tolist()

    def _sample_row(self, row: torch.Tensor, request: TokenSequence) -> torch.Tensor:
        params = request.sampling_params
        probs = sampling_probs(row, params)
        if params.seed is not None and request.generator is None:
            request.generator = torch.Generator(device=row.device).manual_seed(params.seed)
        if request.generator is not None:
            return torch.multinomial(probs, 1, generator=request.generator)[0]
        with DEFAULT_GENERATOR_LOCK:
            return torch.multinomial(probs, 1)[0]


def apply_processors(logits: torch.Tensor, requests: Sequence[TokenSequence]) -> torch.Tensor:
    """`logits` [len(requests), vocab] after each sequence's processors. Processors that only ban or force
    tokens work in place, in the logits' dtype (-inf and 0 are exact in any dtype, and the argmax of bf16
    rows is that of their fp32 upcast); a repetition penalty multiplies, so then a float32 copy is processed
    (generate processes float32 logits). A row's tokens are its prompt and outputs."""
    if not any(r.sampling_params.processors.active for r in requests):
        return logits
    rows = [processor_row(r) for r in requests]
    if all(row.settings.masks_only for row in rows):
        return process_rows(logits, rows)
    return process_rows(logits.to(torch.float32, copy=True), rows)


def processor_row(seq: TokenSequence, tokens: Sequence[int] | None = None) -> Row:
    """The processors' view of a sequence (`tokens`: another token list, e.g. a beam's, of the same length)."""
    params = seq.sampling_params
    return Row(params.processors, seq.all_token_ids if tokens is None else tokens, seq.num_prompt_tokens,
               params.max_new_tokens)  # fmt: skip


def sampling_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from: `row` (processed logits) through every warper."""
    return filtered_probs(
        row, params.temperature, params.top_k, params.top_p,
        min_p=params.min_p, typical_p=params.typical_p,
        epsilon_cutoff=params.epsilon_cutoff, eta_cutoff=params.eta_cutoff,
    )  # fmt: skip


def filtered_probs(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    *,
    min_p: float = 0.0,
    typical_p: float = 1.0,
    epsilon_cutoff: float = 0.0,
    eta_cutoff: float = 0.0,
) -> torch.Tensor:
    """Softmax of `logits / temperature` restricted to the top-k, the top-p nucleus, then min-p, typical-p,
    epsilon and eta cutoffs (generate's warper order).

    Matches transformers' warpers: top-p keeps the smallest set whose mass reaches `top_p`
    (always at least one token); the last four are transformers' own warpers (one token kept at least).
    Finite for any temperature > 0 (`scaled_logits`)."""
    logits = scaled_logits(logits, temperature)
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    for warper in _cutoff_warpers(min_p, typical_p, epsilon_cutoff, eta_cutoff):
        logits = warper(None, logits[None])[0]
    return logits.softmax(dim=-1)


def _cutoff_warpers(min_p: float, typical_p: float, epsilon: float, eta: float) -> list[Any]:
    """transformers' warpers for the cutoffs that are on, in generate's order (a shift of the logits, which
    `scaled_logits` makes, changes none of them: each works on their softmax)."""
    warpers: list[Any] = []
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    if typical_p < 1:
        warpers.append(TypicalLogitsWarper(typical_p))
    if 0 < epsilon < 1:
        warpers.append(EpsilonLogitsWarper(epsilon))
    if 0 < eta < 1:
        warpers.append(EtaLogitsWarper(eta))
    return warpers


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`(logits - max) / temperature` in float32: the maximum is exactly 0 and every other entry <= 0.

    Softmax is unchanged by the shift. Without it a tiny temperature (1e-300 is 0 in float32) turns logits
    into +-inf and the softmax into NaN; with it the maximum stays 0 (0 / 0 is masked) and the others go to
    -inf, so the distribution degenerates to the argmax. (A row with no finite logit stays NaN: the
    sampler then raises, and the engine isolates that request.)"""
    logits = logits.float()
    shifted = logits - logits.max()
    return (shifted / temperature).masked_fill(shifted == 0, 0.0)


class StopChecker:
    """Decides, after each new token, whether a request is finished and why.

    Order: EOS (unless `ignore_eos`) and stop token ids -> "stop" (an EOS `forced_eos_token_id` put at the
    length limit -> "length"); a stop string in the detokenized
    tail -> "stop"; `max_new_tokens` or the model's maximum length -> "length"."""

    def __init__(self, eos_token_ids: Sequence[int] = (), tokenizer: Any = None, max_model_len: int | None = None):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def check(self, request: TokenSequence) -> RequestStatus | None:
        params = request.sampling_params
        last = request.output_token_ids[-1]
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            if last == params.processors.forced_eos_token_id and request.num_output_tokens >= params.max_new_tokens:
                return RequestStatus.FINISHED_LENGTH  # an EOS forced at the limit ends it because of the limit
            return RequestStatus.FINISHED_STOPPED
        if params.stop and self._stop_string_in_tail(request):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_new_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _stop_string_in_tail(self, request: TokenSequence) -> bool:
        if self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        # A stop string of c characters ends within the last c (+ a few partial-byte) tokens.
        span = max(len(s) for s in request.sampling_params.stop) + 4
        tail = self.tokenizer.decode(request.output_token_ids[-span:], skip_special_tokens=True)
        return any(s in tail for s in request.sampling_params.stop)

    def output_text(self, request: TokenSequence, tokens: Sequence[int] | None = None) -> str | None:
        """The decoded output (`tokens`, default the sequence's), cut before the first stop string (kept if
        `include_stop_str_in_output`)."""
        if self.tokenizer is None:
            return None
        output = request.output_token_ids if tokens is None else tokens
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        params = request.sampling_params
        cuts = [(i, s) for s in params.stop if (i := text.find(s)) >= 0]
        if cuts:
            i, s = min(cuts)
            text = text[: i + len(s)] if params.include_stop_str_in_output else text[:i]
        return text
