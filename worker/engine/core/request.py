"""One generation request -- decoder-only or encoder-decoder -- as the scheduler and the KV manager see it.

A `Request` is what a caller asked for: a priority, an optional encoder input, and one or more
`TokenSequence`s (one per beam) whose tokens the model extends step by step. The scheduler orders and admits
requests; the KV manager gives each sequence its self-attention blocks and each encoder-decoder request its
encoder pages (`KVCacheManager.allocate`).

Token accounting of a sequence (as in vLLM v1)::

    all_token_ids:   [ prompt ............ | outputs ....... ]
                     <---- num_computed_tokens ---->|<- to compute ->
                                                    num_tokens - num_computed_tokens

A freshly sampled token is appended to `output_token_ids` before its K/V exist, so a decoding sequence
always has exactly one token left to compute. Preemption resets `num_computed_tokens` to 0 (recompute); for a
decoder-only model the prefix cache usually gives most of it back. A decoder-only prompt is the sequence's
prompt; an encoder-decoder sequence's prompt is the decoder start token, its input is `Request.encoder_ids`.

A request's cost in a step (`Request.step_cost`), the one thing the scheduler asks about architecture: the
rows its sequences compute, plus its encoder input when its encoder has not run yet (admission, or after a
preemption). Only a request with one sequence and no encoder may be split into chunks (`splittable`).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedq.worker.engine.decoding.beam_search import BeamSearch
    from pagedq.worker.engine.decoding.sampling import SamplingParams
    from pagedq.worker.engine.decoding.seq2seq_options import DecodeSettings
    from pagedq.worker.engine.paged.block_pool import BlockHash, KVBlock

#: How many preemptions raise a request's rank among requests of equal priority (vLLM #41951):
#: bounded, so a request that keeps being preempted cannot starve fresh ones either.
MAX_PREEMPTION_BOOST = 3

_arrival_counter = itertools.count()

TokenCallback = Callable[[str, int], None]


class FinishReason(enum.StrEnum):
    """Why a request ended (the strings are vLLM's and the task results')."""

    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens or the model's length
    ABORT = "abort"  # cancelled (by its caller, or by the engine loop when its deadline passed)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.value in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self.value)


_FINISH_REASONS = {reason.value: reason for reason in FinishReason}


@dataclass(eq=False)
class TokenSequence:
    """The tokens of one decoder sequence and how many of them have K/V. Identity is the object; `seq_id`
    names its block table in the KV manager."""

    seq_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    on_token: TokenCallback | None = None  # called with (seq_id, token) for every appended output token
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit of the latest admission
    block_hashes: list[BlockHash] = field(default_factory=list)  # of full blocks, grows lazily
    generator: Any = None  # torch.Generator for seeded sampling, created by the sampler
    stop_text: str | None = None  # detokenized output, truncated at a stop string (if any)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id!r} has an empty prompt")
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.all_token_ids:
            self.all_token_ids = self.prompt_token_ids + self.output_token_ids

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
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.on_token is not None:
            self.on_token(self.seq_id, token_id)

    def __repr__(self) -> str:
        return f"TokenSequence({self.seq_id!r}, computed={self.num_computed_tokens}/{self.num_tokens})"


@dataclass(eq=False)
class Request:
    """Scheduling state of one request. Identity is the object; `request_id` is the caller's name."""

    request_id: str
    sequences: list[TokenSequence]
    priority: int = 0
    encoder_ids: list[int] | None = None  # encoder-decoder models: the encoder's input
    settings: DecodeSettings | None = None  # encoder-decoder models: every decode option, resolved once
    seats: int = 1  # running sequences it may hold at once (num_beams), counted against max_num_seqs
    beam: BeamSearch | None = None
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    encoder_blocks: list[KVBlock] = field(default_factory=list)  # its cross-attention K/V pages
    encoded: bool = False  # its cross K/V are in `encoder_blocks`
    output_token_ids: list[int] = field(default_factory=list)  # encoder-decoder: the chosen output, once finished
    first_token_at: float | None = None  # time.monotonic() at the end of the step that gave its first token

    def __post_init__(self) -> None:
        if not self.sequences:
            raise ValueError(f"request {self.request_id!r} has no sequence")
        if self.encoder_ids is not None and not self.encoder_ids:
            raise ValueError(f"request {self.request_id!r} has no input tokens")

    @classmethod
    def decoder_only(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
        on_token: TokenCallback | None = None,
    ) -> Request:
        """A request of one sequence whose prompt is the model's input."""
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        sequence = TokenSequence(request_id, prompt_token_ids, sampling_params, on_token)
        return cls(request_id, [sequence], priority)

    @property
    def sequence(self) -> TokenSequence:
        """The first (for a request without beams, the only) sequence."""
        return self.sequences[0]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def has_encoder(self) -> bool:
        return self.encoder_ids is not None

    @property
    def encoder_len(self) -> int:
        return len(self.encoder_ids) if self.encoder_ids is not None else 0

    @property
    def splittable(self) -> bool:
        """May its next rows be cut into chunks over several steps (a decoder-only prompt)?"""
        return self.encoder_ids is None and len(self.sequences) == 1

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Lower runs first: priority, then a bounded boost for preempted requests, then arrival."""
        return (self.priority, -min(self.num_preemptions, MAX_PREEMPTION_BOOST), self.arrival)

    def num_rows(self) -> int:
        """Decoder rows its sequences compute in their next step (unsplit)."""
        return sum(seq.num_uncomputed for seq in self.sequences)

    def step_cost(self) -> int:
        """Its tokens in the next step: every row, plus the encoder input if the encoder has not run."""
        return self.num_rows() + (self.encoder_len if not self.encoded else 0)

    def __repr__(self) -> str:
        return f"Request({self.request_id!r}, {self.status.value}, prio={self.priority}, seqs={len(self.sequences)})"


@dataclass
class RequestOutput:
    """What `LLMEngine.step()` reports for a request that progressed or finished this step."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    text: str | None = None  # decoded output when the engine has a tokenizer and the request finished
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    first_token_at: float | None = None  # time.monotonic() of its first token

    @classmethod
    def of(cls, request: Request, text: str | None = None) -> RequestOutput:
        seq = request.sequence
        # a beam request's output is its best hypothesis, chosen when it ends; an encoder-decoder's likewise
        chosen = request.has_encoder or request.beam is not None
        outputs = request.output_token_ids if chosen else seq.output_token_ids
        return cls(
            request_id=request.request_id,
            prompt_token_ids=request.encoder_ids if request.encoder_ids is not None else seq.prompt_token_ids,
            output_token_ids=list(outputs),
            finished=request.is_finished,
            finish_reason=request.status.finish_reason,
            text=text,
            num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=request.num_preemptions,
            first_token_at=request.first_token_at,
        )
