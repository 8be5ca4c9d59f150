"""What both paged engines (`decoder_only.LLMEngine`, `seq2seq.Seq2SeqEngine`) share: one scheduler over one KV
manager, step counters, cancellation, typed stats, and running a list of inputs to completion.

An engine adds requests its own way (a prompt and `SamplingParams`; an encoder input and `DecodeSettings`) and
runs its own forward in `step()`; everything else is here. Not thread-safe: one thread drives an engine.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from pagedq.worker.engine.core.request import RequestOutput
from pagedq.worker.engine.core.scheduler import Scheduler
from pagedq.worker.engine.core.stats import EngineStats, StepCounters
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager


class PagedEngine(ABC):
    scheduler: Scheduler
    kv: KVCacheManager
    counters: StepCounters

    @abstractmethod
    def step(self) -> list[RequestOutput]:
        """One scheduling step and (if anything is scheduled) one forward pass; finished requests' outputs."""

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request wherever it is; its blocks are free on return. Reported by the next step."""
        return self.scheduler.abort_request(request_id) is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> EngineStats:
        return EngineStats.of(self.scheduler, self.counters)

    def reset_counters(self) -> None:
        """Zero the step counters (after a load-time probe, so that stats count real requests)."""
        self.counters = StepCounters()

    def _run_all(
        self, add: Callable[[str, Any, Any], None], inputs: Sequence[Any], options: Any
    ) -> list[RequestOutput]:
        """Add every input (with one options object for all, or a sequence of one each), step until all have
        finished; outputs in input order (for tests and benchmarks)."""
        each = list(options) if isinstance(options, Sequence) else [options] * len(inputs)
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(inputs))]
        for request_id, one, opts in zip(ids, inputs, each, strict=True):
            add(request_id, one, opts)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            done.update((o.request_id, o) for o in self.step() if o.finished)
        return [done[request_id] for request_id in ids]
