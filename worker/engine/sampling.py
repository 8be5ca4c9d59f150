"""Sampling parameters and the batched sampler: logits rows -> next token ids.

Greedy rows are decided with one `argmax` over all of them. Sampled rows apply temperature, top-k and
top-p in fp32 and draw with the request's own `torch.Generator` when it has a seed, so a seeded
request gives the same tokens whatever else shares its batch.

Any positive temperature stays finite: logits are shifted so their maximum is exactly 0 before they are
divided, so a vanishing temperature sends every other logit to -inf (argmax) instead of inf - inf = NaN.
A temperature below `GREEDY_BELOW_TEMPERATURE` is greedy outright (vLLM's `_SAMPLING_EPS` convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.request import Request, RequestStatus

#: Temperatures below this sample greedily: `exp(-gap / T)` for any logit gap the model can tell apart is 0.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    `temperature == 0` (or below `GREEDY_BELOW_TEMPERATURE`) means greedy. `stop` strings need the engine
    to have a tokenizer. EOS ids come from the engine (model generation config) unless `ignore_eos` is set
    (benchmarks)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class Sampler:
    """Picks one token per logits row. Rows are in the order of `requests`."""

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        if not requests:
            return []
        out = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
        if len(greedy) == len(requests):
            out = logits.argmax(dim=-1)
        else:
            if greedy:
                idx = torch.tensor(greedy, device=logits.device)
                out[idx] = logits[idx].argmax(dim=-1)
            for i, request in enumerate(requests):
                if not request.sampling_params.greedy:
                    out[i] = self._sample_row(logits[i], request)
        return out.tolist()

    def _sample_row(self, row: torch.Tensor, request: Request) -> torch.Tensor:
        params = request.sampling_params
        probs = filtered_probs(row.float(), params.temperature, params.top_k, params.top_p)
        if params.seed is not None and request.generator is None:
            request.generator = torch.Generator(device=row.device).manual_seed(params.seed)
        return torch.multinomial(probs, 1, generator=request.generator)[0]


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of `logits / temperature` restricted to the top-k, then to the top-p nucleus.

    Matches transformers' warpers: top-p keeps the smallest set whose mass reaches `top_p`
    (always at least one token). Finite for any temperature > 0 (`scaled_logits`)."""
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
    return logits.softmax(dim=-1)


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

    Order: EOS (unless `ignore_eos`) and stop token ids -> "stop"; a stop string in the detokenized
    tail -> "stop"; `max_new_tokens` or the model's maximum length -> "length"."""

    def __init__(self, eos_token_ids: Sequence[int] = (), tokenizer: Any = None, max_model_len: int | None = None):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def check(self, request: Request) -> RequestStatus | None:
        params = request.sampling_params
        last = request.output_token_ids[-1]
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if params.stop and self._stop_string_in_tail(request):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_new_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _stop_string_in_tail(self, request: Request) -> bool:
        if self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        # A stop string of c characters ends within the last c (+ a few partial-byte) tokens.
        span = max(len(s) for s in request.sampling_params.stop) + 4
        tail = self.tokenizer.decode(request.output_token_ids[-span:], skip_special_tokens=True)
        return any(s in tail for s in request.sampling_params.stop)

    def output_text(self, request: Request) -> str | None:
        """The decoded output, cut before the first stop string (kept if `include_stop_str_in_output`)."""
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        params = request.sampling_params
        cuts = [(i, s) for s in params.stop if (i := text.find(s)) >= 0]
        if cuts:
            i, s = min(cuts)
            text = text[: i + len(s)] if params.include_stop_str_in_output else text[:i]
        return text
