"""One generation request as the scheduler and the KV manager see it.

Token accounting (as in vLLM v1)::

    all_token_ids:   [ prompt ............ | outputs ....... ]
                     <---- num_computed_tokens ---->|<- to compute ->
                                                    num_tokens - num_computed_tokens

A freshly sampled token is appended to `output_token_ids` before its K/V exist, so a decoding
request always has exactly one token left to compute. Preemption resets `num_computed_tokens` to 0
(recompute); the prefix cache usually gives most of it back.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedq.worker.engine.block_pool import BlockHash
    from pagedq.worker.engine.sampling import SamplingParams

#: How many preemptions raise a request's rank among requests of equal priority (vLLM #41951):
#: bounded, so a request that keeps being preempted cannot starve fresh ones either.
MAX_PREEMPTION_BOOST = 3

_arrival_counter = itertools.count()

TokenCallback = Callable[[str, int], None]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_EXPIRED = "expired"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "expired")

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    """Scheduling state of one request. Identity is the object; `request_id` is the caller's name."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    deadline: float | None = None  # time.time() epoch
    on_token: TokenCallback | None = None
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit of the latest admission
    num_preemptions: int = 0
    block_hashes: list[BlockHash] = field(default_factory=list)  # of full blocks, grows lazily
    generator: Any = None  # torch.Generator for seeded sampling, created by the sampler
    stop_text: str | None = None  # detokenized output, truncated at a stop string (if any)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Lower runs first: priority, then a bounded boost for preempted requests, then arrival."""
        return (self.priority, -min(self.num_preemptions, MAX_PREEMPTION_BOOST), self.arrival)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.on_token is not None:
            self.on_token(self.request_id, token_id)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, prio={self.priority}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )


@dataclass
class RequestOutput:
    """What `LLMEngine.step()` reports for a request that progressed or finished this step."""

    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # stop | length | abort | expired
    text: str | None = None  # decoded output when the engine has a tokenizer and the request finished
    num_cached_tokens: int = 0

    @classmethod
    def of(cls, request: Request, text: str | None = None) -> RequestOutput:
        return cls(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            finished=request.is_finished,
            finish_reason=request.status.finish_reason,
            text=text,
            num_cached_tokens=request.num_cached_tokens,
        )
