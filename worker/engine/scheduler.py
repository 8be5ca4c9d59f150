"""Iteration-level scheduler: each step hands out `{request: num_tokens}` under one token budget.

There are no prefill and decode phases: a decoding request asks for 1 token, a prefilling one for a
chunk of its prompt, and both share the step. Requests are visited in one merged order::

    (priority, running-before-waiting, preemption boost, arrival)

so the token budget, KV blocks and running seats go to higher priority first, and at equal priority
running requests go before new ones (vLLM's rule). Cases, one method each:

- `_expire`: deadlines passed -> finished `expired`, blocks freed;
- `_schedule_running`: a running request gets its next chunk; if blocks run out, the worst running
  request not yet visited this step (possibly itself) is preempted by recompute;
- `_schedule_waiting`: a waiting request is admitted with its prefix-cache hit; if blocks or the
  running cap run out, it may preempt a running request of strictly lower priority (no inversion,
  cf. vLLM #40004; strictly, so equal priorities never ping-pong);
- `_preempt`: free blocks, requeue with a bounded boost (vLLM #41951) for the next step.

Invariants: a request scheduled in a step is never preempted in that step (victims are always
unvisited), so blocks published by its allocation are written by the step that follows; after a
preemption forced by block pressure, no new request is admitted in the same step (no thrash).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from pagedq.worker.engine.kv_cache_manager import KVCacheManager
from pagedq.worker.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 4096  # token budget of one step
    max_num_seqs: int = 64  # running requests at most
    long_prefill_token_threshold: int = 0  # max chunk of one request per step; 0: the budget


@dataclass
class SchedulerOutput:
    """The hand-off from scheduler to runner. `requests` and `num_tokens` are parallel lists."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # aborted / expired since the last step

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_tokens.append(num_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self._waiting: list[tuple[tuple[int, int, int], Request]] = []  # heap; finished entries skipped
        self._deadlines: list[tuple[float, int, Request]] = []  # heap of (deadline, arrival, request)
        self._finished: list[Request] = []  # aborted / expired, reported by the next schedule()
        self.num_waiting = 0
        self.num_preemptions = 0

    # ---- requests in and out ------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} already exists")
        self.requests[request.request_id] = request
        self._push_waiting(request)
        if request.deadline is not None:
            heapq.heappush(self._deadlines, (request.deadline, request.arrival, request))

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
            self.running.remove(request)
        elif not request.is_finished:
            self.num_waiting -= 1  # its heap entry is skipped lazily
        self.kv.free(request)
        request.status = status
        self.requests.pop(request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished)

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._finished)
        self._finished = []
        self._expire(time.time() if now is None else now, out)
        self._schedule(out)
        for request in out.preempted:  # requeued only now, so not re-admitted in the same step
            self._push_waiting(request)
        out.copies = self.kv.take_copies()
        return out

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: the scheduled tokens now have K/V."""
        for request, n in zip(out.requests, out.num_tokens, strict=True):
            if not request.is_finished:
                request.num_computed_tokens += n

    def _schedule(self, out: SchedulerOutput) -> None:
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda r: r.sort_key)
        queue = deque(self.running)  # unvisited running requests, best first
        admit = True  # False after a block-pressure preemption
        while budget > 0 and (queue or (admit and self._peek_waiting() is not None)):
            waiting = self._peek_waiting() if admit else None
            if queue and (waiting is None or queue[0].priority <= waiting.priority):
                num_preempted = len(out.preempted)
                n = self._schedule_running(queue.popleft(), queue, budget, out)
                admit = admit and len(out.preempted) == num_preempted
            else:
                assert waiting is not None
                n = self._schedule_waiting(waiting, queue, budget, out)
                if n == 0:
                    break
            budget -= n

    def _chunk(self, request: Request, num_computed: int, budget: int) -> int:
        n = min(request.num_tokens - num_computed, budget)
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _schedule_running(self, request: Request, queue: deque[Request], budget: int, out: SchedulerOutput) -> int:
        """Schedule `request`'s next chunk, preempting from the tail of `queue` for blocks."""
        n = self._chunk(request, request.num_computed_tokens, budget)
        assert n > 0, f"{request} is running with nothing to compute"
        while not self.kv.allocate_slots(request, n):
            victim = queue.pop() if queue else request
            self._preempt(victim, out)
            if victim is request:
                return 0
        out.add(request, n)
        return n

    def _schedule_waiting(self, request: Request, queue: deque[Request], budget: int, out: SchedulerOutput) -> int:
        """Admit the best waiting request; 0 if it cannot be admitted (the step stops admitting)."""
        hits = self.kv.get_computed_blocks(request)
        num_hit = len(hits) * self.kv.block_size
        n = self._chunk(request, num_hit, budget)
        while len(self.running) >= self.config.max_num_seqs or not self.kv.allocate_slots(request, n, hits):
            if not queue or queue[-1].priority <= request.priority:
                return 0  # only a strictly lower-priority running request may make room
            self._preempt(queue.pop(), out)
        heapq.heappop(self._waiting)
        self.num_waiting -= 1
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = request.num_cached_tokens = num_hit
        self.running.append(request)
        out.add(request, n)
        return n

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preempt by recompute: free all blocks; the request is requeued after this step."""
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(request)

    def _expire(self, now: float, out: SchedulerOutput) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, request = heapq.heappop(self._deadlines)
            if not request.is_finished:
                self.finish_request(request, RequestStatus.FINISHED_EXPIRED)
                out.finished.append(request)

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
