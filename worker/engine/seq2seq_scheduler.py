"""Scheduler for encoder-decoder requests: one token budget over encoder passes and decoder rows.

A request's cost in a step (its "tokens"):

    admitted now   encoder_len + decoder rows     (its encoder runs, its output fills its pages)
    running        one row per live sequence      (beams: up to num_beams rows)
    resumed        encoder_len + every sequence's whole prefix (preemption is by recompute)

KV blocks (one pool, `BlockPool`): a request holds exactly ceil(encoder_len / encoder_block_size) pages
of its encoder output (`cross_blocks`, read by every layer's cross-attention, `seq2seq_attention`) from
admission to its end -- its real length, never a batch maximum -- plus its sequences' self blocks
(`KVCacheManager`, no prefix caching: beams share blocks by `fork`, copy-on-write on divergence).

Order, as in the decoder-only scheduler: (priority, running before waiting, preemption boost, arrival).
Running requests are served first; if blocks run out, the worst running request not yet scheduled in
this step (possibly the one being served) is preempted: all its blocks are freed, its encoder is re-run
and its decoder prefixes recomputed when it is admitted again (we keep only token ids, never tensors).
A waiting request may preempt a strictly lower-priority running one. After a preemption for blocks
nothing new is admitted in that step. `max_running_requests` caps sequences (a beam request takes
`num_beams` seats), so a step's decoder rows never exceed it.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from pagedq.worker.engine._generation import DecodeSettings
from pagedq.worker.engine.beam_search import BeamSearch
from pagedq.worker.engine.block_pool import BlockPool, KVBlock
from pagedq.worker.engine.kv_cache_manager import KVCacheManager, cdiv
from pagedq.worker.engine.request import MAX_PREEMPTION_BOOST, Request, RequestStatus

_arrivals = itertools.count()


@dataclass(eq=False)
class Seq2SeqRequest:
    """One translation: encoder input, live decoder sequences (beams), blocks held, and the outcome."""

    request_id: str
    encoder_ids: list[int]
    settings: DecodeSettings
    priority: int = 0
    deadline: float | None = None  # time.time() epoch
    arrival: int = field(default_factory=lambda: next(_arrivals))
    status: RequestStatus = RequestStatus.WAITING
    sequences: list[Request] = field(default_factory=list)  # live decoder sequences, one per beam
    beam: BeamSearch | None = None
    cross_blocks: list[KVBlock] = field(default_factory=list)
    encoded: bool = False  # its encoder output is in `cross_blocks`
    num_preemptions: int = 0
    output_token_ids: list[int] = field(default_factory=list)  # generated tokens once finished
    first_token_at: float | None = None  # time.monotonic() at the end of the step that gave its first token

    @property
    def encoder_len(self) -> int:
        return len(self.encoder_ids)

    @property
    def seats(self) -> int:
        return self.settings.num_beams

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.priority, -min(self.num_preemptions, MAX_PREEMPTION_BOOST), self.arrival)

    def num_rows(self) -> int:
        """Decoder rows this request computes in its next step."""
        return sum(seq.num_tokens - seq.num_computed_tokens for seq in self.sequences)

    def step_cost(self) -> int:
        return self.num_rows() + (0 if self.encoded else self.encoder_len)

    def __repr__(self) -> str:
        return f"Seq2SeqRequest({self.request_id!r}, {self.status.value}, seqs={len(self.sequences)})"


@dataclass
class Seq2SeqSchedule:
    """The hand-off from scheduler to engine for one step."""

    scheduled: list[Seq2SeqRequest] = field(default_factory=list)
    encode: set[int] = field(default_factory=set)  # ids (id()) of scheduled requests whose encoder runs now
    preempted: list[Seq2SeqRequest] = field(default_factory=list)
    finished: list[Seq2SeqRequest] = field(default_factory=list)  # aborted / expired since the last step


class Seq2SeqScheduler:
    def __init__(
        self, kv: KVCacheManager, max_batch_tokens: int, max_running_seqs: int, encoder_block_size: int
    ) -> None:
        self.kv = kv
        self.encoder_block_size = encoder_block_size  # encoder rows per page
        self.pool: BlockPool = kv.pool
        self.max_batch_tokens = max_batch_tokens
        self.max_running_seqs = max_running_seqs
        self.requests: dict[str, Seq2SeqRequest] = {}
        self.running: list[Seq2SeqRequest] = []
        self._waiting: list[tuple[tuple[int, int, int], Seq2SeqRequest]] = []  # heap; finished entries skipped
        self._deadlines: list[tuple[float, int, Seq2SeqRequest]] = []
        self._finished: list[Seq2SeqRequest] = []
        self.num_waiting = 0
        self.num_preemptions = 0

    # ---- requests in and out ------------------------------------------------------------------

    def blocks_needed(self, request: Seq2SeqRequest) -> int:
        """Worst case: encoder pages + every beam at max length, plus one copy-on-write block per beam."""
        bs = self.kv.block_size
        return self.encoder_pages(request) + request.seats * (cdiv(request.settings.max_length, bs) + 1)

    def encoder_pages(self, request: Seq2SeqRequest) -> int:
        return cdiv(request.encoder_len, self.encoder_block_size)

    def add_request(self, request: Seq2SeqRequest) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} already exists")
        self.requests[request.request_id] = request
        self._push_waiting(request)
        if request.deadline is not None:
            heapq.heappush(self._deadlines, (request.deadline, request.arrival, request))

    def abort_request(self, request_id: str) -> Seq2SeqRequest | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish_request(request, RequestStatus.FINISHED_ABORTED)
        self._finished.append(request)
        return request

    def finish_request(self, request: Seq2SeqRequest, status: RequestStatus) -> None:
        assert status.is_finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif not request.is_finished:
            self.num_waiting -= 1  # its heap entry is skipped lazily
        self._free(request)
        request.status = status
        self.requests.pop(request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished)

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> Seq2SeqSchedule:
        out = Seq2SeqSchedule(finished=self._finished)
        self._finished = []
        self._expire(time.time() if now is None else now, out)
        budget = self.max_batch_tokens
        self.running.sort(key=lambda r: r.sort_key)
        queue = deque(self.running)  # unvisited running requests, best first
        admit = True
        while queue or (admit and self._peek_waiting() is not None):
            waiting = self._peek_waiting() if admit else None
            if queue and (waiting is None or queue[0].priority <= waiting.priority):
                request = queue.popleft()
                if request.step_cost() > budget and out.scheduled:
                    continue  # next step; rows are never split
                num_preempted = len(out.preempted)
                budget -= self._schedule_running(request, queue, out)
                admit = admit and len(out.preempted) == num_preempted
            else:
                assert waiting is not None
                cost = waiting.step_cost()
                if cost > budget and out.scheduled:
                    break
                if not self._schedule_waiting(waiting, queue, out):
                    break
                budget -= cost
        for request in out.preempted:  # requeued only now, so not re-admitted in the same step
            self._push_waiting(request)
        return out

    def seats_taken(self) -> int:
        return sum(r.seats for r in self.running)

    def _schedule_running(self, request: Seq2SeqRequest, queue: deque[Seq2SeqRequest], out: Seq2SeqSchedule) -> int:
        while not self._allocate(request):
            victim = queue.pop() if queue else request
            self._preempt(victim, out)
            if victim is request:
                return 0
        out.scheduled.append(request)
        return request.step_cost()

    def _schedule_waiting(self, request: Seq2SeqRequest, queue: deque[Seq2SeqRequest], out: Seq2SeqSchedule) -> bool:
        """Admit the best waiting request; False if it cannot be admitted (the step stops admitting)."""
        while self.seats_taken() + request.seats > self.max_running_seqs or not self._allocate(request):
            if not queue or queue[-1].priority <= request.priority:
                return False  # only a strictly lower-priority running request may make room
            self._preempt(queue.pop(), out)
        heapq.heappop(self._waiting)
        self.num_waiting -= 1
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        out.scheduled.append(request)
        out.encode.add(id(request))
        return True

    def _allocate(self, request: Seq2SeqRequest) -> bool:
        """Blocks for the request's next rows (and its cross blocks if not encoded); all or nothing."""
        cross = 0 if request.encoded else self.encoder_pages(request)
        need = cross + sum(self.kv.num_blocks_to_allocate(s, s.num_tokens - s.num_computed_tokens)
                           for s in request.sequences)  # fmt: skip
        if need > self.pool.num_free_blocks:
            return False
        if cross:
            request.cross_blocks = self.pool.allocate(cross)
        for seq in request.sequences:
            ok = self.kv.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
            assert ok, "num_blocks_to_allocate over-estimates; allocation cannot fail here"
        return True

    def _preempt(self, request: Seq2SeqRequest, out: Seq2SeqSchedule) -> None:
        """Preempt by recompute: free every block; encoder and decoder prefixes run again on re-admission."""
        self.running.remove(request)
        self._free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(request)

    def _free(self, request: Seq2SeqRequest) -> None:
        for seq in request.sequences:
            self.kv.free(seq)
            seq.num_computed_tokens = 0
        self.pool.free(reversed(request.cross_blocks))
        request.cross_blocks = []
        request.encoded = False

    def _expire(self, now: float, out: Seq2SeqSchedule) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, request = heapq.heappop(self._deadlines)
            if not request.is_finished:
                self.finish_request(request, RequestStatus.FINISHED_EXPIRED)
                out.finished.append(request)

    # ---- waiting queue ------------------------------------------------------------------------

    def _push_waiting(self, request: Seq2SeqRequest) -> None:
        if request.status is not RequestStatus.PREEMPTED:
            request.status = RequestStatus.WAITING
        heapq.heappush(self._waiting, (request.sort_key, request))
        self.num_waiting += 1

    def _peek_waiting(self) -> Seq2SeqRequest | None:
        while self._waiting and self._waiting[0][1].is_finished:
            heapq.heappop(self._waiting)
        return self._waiting[0][1] if self._waiting else None
