"""Iteration-level scheduler for every generative architecture: each step hands out rows under one token budget.

There are no prefill and decode phases: a decoding sequence asks for 1 row, a decoder-only prompt for a chunk
of itself, an encoder-decoder request being admitted for its encoder input plus its decoder rows, and all of
them share the step. Requests are visited in one merged order::

    (priority, running-before-waiting, preemption boost, arrival)

so the token budget, KV blocks and running seats go to higher priority first, and at equal priority running
requests go before new ones (vLLM's rule). Deadlines are not the scheduler's: the worker's engine loop
(`engine/service.py`) owns every request's deadline and cancels it through its executor, which aborts it
here. What depends on the architecture is asked of the request and the KV manager, never branched on here:
`Request.step_cost` (and `Request.splittable`: only a decoder-only prompt is cut into chunks; other rows are
never split) and `KVCacheManager.allocate` (self-attention blocks of every sequence, plus encoder pages for an
encoder-decoder request whose encoder runs in this step). Cases, one
method each:

- `_schedule_running`: a running request gets its next rows; if blocks run out, the worst running
  request not yet visited this step (possibly itself) is preempted by recompute;
- `_schedule_waiting`: a waiting request is admitted with its prefix-cache hit; if blocks or the
  running seats run out, it may preempt a running request of strictly lower priority (no inversion,
  cf. vLLM #40004; strictly, so equal priorities never ping-pong);
- `_preempt`: free every block, requeue with a bounded boost (vLLM #41951) for the next step.

Invariants: a request scheduled in a step is never preempted in that step (victims are always unvisited), so
blocks published by its allocation are written by the step that follows; after a preemption forced by block
pressure, no new request is admitted in the same step (no thrash). A request whose unsplit step does not fit
the remaining budget waits for the next step, unless nothing is scheduled yet (no starvation by size).
Seats: a request takes `Request.seats` (its beams) of `max_num_seqs`, so a step's rows never exceed it.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from pagedq.worker.engine.core.request import Request, RequestStatus, TokenSequence
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 4096  # token budget of one step
    max_num_seqs: int = 64  # running sequences at most (a request takes its seats)
    long_prefill_token_threshold: int = 0  # max chunk of one prompt per step; 0: the budget


@dataclass
class SchedulerOutput:
    """The hand-off from scheduler to runner.

    `requests` and `num_tokens` (each one's cost, encoder input included) are parallel lists; so are
    `sequences` and `rows` (the decoder rows each scheduled sequence computes)."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    sequences: list[TokenSequence] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # aborted since the last step

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, request: Request, rows: list[int]) -> int:
        cost = sum(rows) + (request.encoder_len if not request.encoded else 0)
        self.requests.append(request)
        self.num_tokens.append(cost)
        self.sequences.extend(request.sequences)
        self.rows.extend(rows)
        return cost


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self._waiting: list[tuple[tuple[int, int, int], Request]] = []  # heap; finished entries skipped
        self._finished: list[Request] = []  # aborted, reported by the next schedule()
        self.num_waiting = 0
        self.num_seats = 0  # seats of running requests
        self.num_preemptions = 0

    @property
    def saturated(self) -> bool:
        """Whether the latest schedule could not have taken more: requests wait, or every seat is taken."""
        return self.num_waiting > 0 or self.num_seats >= self.config.max_num_seqs

    # ---- requests in and out ------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} already exists")
        if request.seats > self.config.max_num_seqs:
            raise ValueError(f"a request of {request.seats} sequences exceeds max_num_seqs={self.config.max_num_seqs}")
        self.requests[request.request_id] = request
        self._push_waiting(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a request wherever it is; its blocks are free when this returns."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish_request(request, RequestStatus.FINISHED_ABORTED)
        self._finished.append(request)
        return request

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        assert status.is_finished
        if request.status is RequestStatus.RUNNING:
            self._leave_running(request)
        elif not request.is_finished:
            self.num_waiting -= 1  # its heap entry is skipped lazily
        self.kv.free_request(request)
        request.status = status
        self.requests.pop(request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished)

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._finished)
        self._finished = []
        self._schedule(out)
        for request in out.preempted:  # requeued only now, so not re-admitted in the same step
            self._push_waiting(request)
        out.copies = self.kv.take_copies()
        return out

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: the scheduled rows (and encoders) now have K/V."""
        for seq, n in zip(out.sequences, out.rows, strict=True):
            seq.num_computed_tokens += n
        for request in out.requests:
            request.encoded = request.has_encoder

    def _schedule(self, out: SchedulerOutput) -> None:
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda r: r.sort_key)
        queue = deque(self.running)  # unvisited running requests, best first
        admit = True  # False after a block-pressure preemption
        while budget > 0 and (queue or (admit and self._peek_waiting() is not None)):
            waiting = self._peek_waiting() if admit else None
            if queue and (waiting is None or queue[0].priority <= waiting.priority):
                request = queue.popleft()
                rows = self._rows(request, request.sequence.num_computed_tokens, budget, out)
                if rows is None:
                    continue  # its rows do not fit what is left: next step
                num_preempted = len(out.preempted)
                budget -= self._schedule_running(request, rows, queue, out)
                admit = admit and len(out.preempted) == num_preempted
            else:
                assert waiting is not None
                n = self._schedule_waiting(waiting, queue, budget, out)
                if n == 0:
                    break
                budget -= n

    def _rows(self, request: Request, num_computed: int, budget: int, out: SchedulerOutput) -> list[int] | None:
        """Each sequence's rows this step: a chunk of a splittable prompt, else all of them (None: they do not
        fit the budget left, and something is already scheduled)."""
        if request.splittable:
            n = min(request.sequence.num_tokens - num_computed, budget)
            if self.config.long_prefill_token_threshold > 0:
                n = min(n, self.config.long_prefill_token_threshold)
            return [n]
        if request.step_cost() > budget and out.requests:
            return None
        return [seq.num_uncomputed for seq in request.sequences]

    def _schedule_running(
        self, request: Request, rows: list[int], queue: deque[Request], out: SchedulerOutput
    ) -> int:
        """Schedule `request`'s next rows, preempting from the tail of `queue` for blocks."""
        assert sum(rows) > 0, f"{request} is running with nothing to compute"
        while not self.kv.allocate(request, rows):
            victim = queue.pop() if queue else request
            self._preempt(victim, out)
            if victim is request:
                return 0
        return out.add(request, rows)

    def _schedule_waiting(self, request: Request, queue: deque[Request], budget: int, out: SchedulerOutput) -> int:
        """Admit the best waiting request; 0 if it cannot be admitted (the step stops admitting)."""
        hits = self.kv.get_computed_blocks(request.sequence) if request.splittable else None
        num_hit = len(hits or ()) * self.kv.block_size
        rows = self._rows(request, num_hit, budget, out)
        if rows is None:
            return 0
        while self.num_seats + request.seats > self.config.max_num_seqs or not self.kv.allocate(request, rows, hits):
            if not queue or queue[-1].priority <= request.priority:
                return 0  # only a strictly lower-priority running request may make room
            self._preempt(queue.pop(), out)
        heapq.heappop(self._waiting)
        self.num_waiting -= 1
        request.status = RequestStatus.RUNNING
        if hits is not None:
            request.sequence.num_computed_tokens = request.sequence.num_cached_tokens = num_hit
        self.running.append(request)
        self.num_seats += request.seats
        return out.add(request, rows)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preempt by recompute: free every block; encoder and decoder prefixes run again on re-admission."""
        self._leave_running(request)
        self.kv.free_request(request)
        for seq in request.sequences:
            seq.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(request)

    def _leave_running(self, request: Request) -> None:
        self.running.remove(request)
        self.num_seats -= request.seats

    # ---- waiting queue ------------------------------------------------------------------------

    def _push_waiting(self, request: Request) -> None:
        if request.status is not RequestStatus.PREEMPTED:
            request.status = RequestStatus.WAITING
        heapq.heappush(self._waiting, (request.sort_key, request))
        self.num_waiting += 1

    def _peek_waiting(self) -> Request | None:
        while self._waiting and self._waiting[0][1].is_finished:
            heapq.heappop(self._waiting)
        return self._waiting[0][1] if self._waiting else None
