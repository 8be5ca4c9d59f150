"""A paged engine's gauges and counters, one typed shape for every generative architecture.

The engines count steps in `StepCounters`; `EngineStats.of` reads them with the scheduler's and the KV
manager's state. Executors turn it into their `ModelStats` (core/executor.py), which the metrics collector,
Flower's worker info and the benchmarks read.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedq.worker.engine.core.scheduler import Scheduler


@dataclass
class StepCounters:
    """Cumulative since the engine was built (or its load-time probe was forgotten)."""

    steps: int = 0
    batched_tokens: int = 0  # tokens of every step (decoder rows, plus encoder inputs)
    generated_tokens: int = 0
    encoded_tokens: int = 0  # encoder-decoder models: encoder inputs run

    def step(self, batched_tokens: int, generated_tokens: int) -> None:
        self.steps += 1
        self.batched_tokens += batched_tokens
        self.generated_tokens += generated_tokens


@dataclass(frozen=True)
class EngineStats:
    """In vLLM's vocabulary; `kv_cache_usage_perc` is a 0..1 fraction."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    num_kv_blocks: int
    num_free_kv_blocks: int
    kv_waste_slots: int  # allocated decoder slots not yet written (< one block per running sequence)
    prefix_cache_queries: int  # tokens looked up at admission (decoder-only models)
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    num_steps: int
    num_generated_tokens: int
    num_encoded_tokens: int
    mean_batch_tokens: float

    @classmethod
    def of(cls, scheduler: Scheduler, counters: StepCounters) -> EngineStats:
        kv = scheduler.kv
        running = scheduler.running
        return cls(
            num_requests_running=len(running),
            num_requests_waiting=scheduler.num_waiting,
            kv_cache_usage_perc=kv.pool.usage,
            num_kv_blocks=kv.pool.num_blocks,
            num_free_kv_blocks=kv.pool.num_free_blocks,
            kv_waste_slots=sum(kv.waste_slots(seq) for request in running for seq in request.sequences),
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=scheduler.num_preemptions,
            num_steps=counters.steps,
            num_generated_tokens=counters.generated_tokens,
            num_encoded_tokens=counters.encoded_tokens,
            mean_batch_tokens=counters.batched_tokens / max(counters.steps, 1),
        )
