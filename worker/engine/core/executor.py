"""The contract between the engine loop and the per-model executors.

One `Engine` (worker/engine/service.py) per worker process owns one thread. Celery task threads call
`Engine.submit(EngineRequest) -> Future`. The engine thread hands each request to the `ModelExecutor` of
its model and calls `step()` on every executor that has work, round-robin. An executor micro-batches
everything it holds under the token budget of `EngineConfig` -- never one forward per request -- and
completes each request's future with a result model (`ClassifyResult`, `TranslateResult`, `QAResult`)
or an exception from `pagedq.shared.errors`.

Invariants:
- executors are touched only from the engine thread (no locks inside them), except `prepare`, which any
  thread may call before the request reaches the engine: it reads nothing the engine thread changes;
- a request's future is completed exactly once (use `EngineRequest.finish` / `.fail`);
- `abort` frees everything the request holds (KV blocks, queue slots) before it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, fields
from typing import Any

from pagedq.shared.models import TaskRequest, TaskType
from pagedq.shared.registry import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and memory knobs of one engine (from `pagedq.shared.settings.Settings`)."""

    max_batch_tokens: int = 4096  # token budget of one step, summed over the requests in it
    max_running_requests: int = 64  # cap on requests in one step
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int | None = None  # KV pool per model; None: a default share of memory
    enable_prefix_caching: bool = True
    cpu_prepack_linear: bool = True  # CPU models: linear weights pre-packed for oneDNN (worker/engine/cpu/linear.py)
    #: what the KV pages store: "auto" (the model's dtype) or "bfloat16" (fp32 / int8 models; paged/kv_dtype.py)
    kv_cache_dtype: str = "auto"
    #: torch intra-op threads of this model's steps (the engine thread sets them before each step); None: the
    #: engine thread's default (torch's: one per core, or OMP_NUM_THREADS); "auto": measured per step size
    #: (worker/engine/threads.py)
    intra_op_threads: int | str | None = None


@dataclass
class LoadedModel:
    """A model loaded once per worker process by `pagedq.worker.registry`, with what executors need."""

    spec: ModelSpec
    model: Any  # a transformers PreTrainedModel, in eval mode, on `device`
    tokenizer: Any  # a transformers tokenizer
    device: Any  # torch.device
    dtype: Any  # torch.dtype


class CallbackFuture:
    """A request's future for callers that never wait on it, only register callbacks: what the engine uses of
    `concurrent.futures.Future` (set_result, set_exception, done, result, exception, add_done_callback), where
    `result` and `exception` do not block. The first completion wins (a lock: the engine thread, a receiver or
    a stopping thread may each complete one); no Condition, which costs a Future ~3 us to build: a bulk
    builds two per item in the engine core -- its request's (worker/engine/process.py: a callback forwards it to
    the front end) and its attempt's (worker/engine/isolation.py: forwarded to the request's). The Celery
    process keeps Futures (measured: no faster with these there, 0.98x, 7 of 14 pairs)."""

    __slots__ = ("_lock", "_done", "_result", "_error", "_callbacks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], None]] = []

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Any:
        if not self._done:
            raise InvalidStateError("the request has not finished (nobody waits on this future)")
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._done:
            raise InvalidStateError("the request has not finished (nobody waits on this future)")
        return self._error

    def set_result(self, result: Any) -> None:
        self._complete(result, None)

    def set_exception(self, error: BaseException) -> None:
        self._complete(None, error)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self)

    def _complete(self, result: Any, error: BaseException | None) -> None:
        with self._lock:
            if self._done:
                raise InvalidStateError("the request is already complete")
            self._done, self._result, self._error = True, result, error
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - as Future does: a callback's error never fails the completion
                log.exception("a callback of request future %r raised", self)


@dataclass(eq=False)
class EngineRequest:
    """One task inside the engine. `deadline` is a `time.time()` epoch (None: no deadline), kept by the engine loop."""

    id: str
    task: TaskType
    payload: TaskRequest
    model: str
    priority: int = 0
    deadline: float | None = None
    arrival: float = field(default_factory=time.monotonic)
    future: Future[Any] = field(default_factory=Future)
    #: set when the caller asked to stream: `stream.open(tokenizer, stop_strings)` returns an
    #: `on_token(request_id, token_id)` callback (worker/streaming.py); executors that do not generate token
    #: by token ignore it, and the text then arrives in one piece with the result
    stream: Any = None
    #: time.monotonic() of its first generated token, set by executors that generate token by token (the
    #: paged engines; not the batched-generate fallback): TTFT and TPOT metrics (worker/metrics.py)
    first_token_at: float | None = None
    finished_at: float | None = None  # time.monotonic() when its future completed with a result
    #: what its executor's `prepare` computed in the submitting thread (e.g. the tokenized text); executors
    #: that find None compute it themselves
    prepared: Any = None

    def finish(self, result: Any, finished_at: float | None = None) -> bool:
        """Complete with a result (`finished_at`: when, time.monotonic(); default now), noted before the
        future's callbacks run; False if the future was already completed (e.g. cancelled)."""
        if self.future.done():
            return False
        self.finished_at = time.monotonic() if finished_at is None else finished_at
        try:
            self.future.set_result(result)
            return True
        except InvalidStateError:
            return False

    def fail(self, error: BaseException) -> bool:
        try:
            self.future.set_exception(error)
            return True
        except InvalidStateError:
            return False


@dataclass
class ModelStats:
    """What every executor reports, in one shape, read by the metrics collector (worker/metrics.py), Flower's
    worker info (worker/app.py) and the benchmarks. Counters count since the executor was built; `extra` holds
    what only one kind of executor has (e.g. padded tokens, fallback requests)."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_requests_finished: int = 0
    steps: int = 0  # batched model steps (forward passes, or `generate` calls on the fallback)
    generated_tokens: int = 0
    kv_cache_usage_perc: float = 0.0  # 0..1
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_preemptions: int = 0
    path: str = ""  # paged | generate | packed | padded | refused
    path_reason: str = ""
    kv_cache_dtype: str = ""  # what a paged engine's KV pages store ("float32", "bfloat16", ...); "" without one
    intra_op_threads: int = 0  # the torch intra-op threads its latest step ran with (the engine's snapshot; 0: none)
    #: with `intra_op_threads = "auto"`: the engine's estimates, step size (tokens, up to) -> threads -> us per
    #: token (worker/engine/threads.py); None otherwise
    intra_op_auto: dict[str, dict[str, float]] | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat, for JSON readers (`celery inspect stats`, benchmarks): the fields, then `extra`'s keys."""
        flat: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**flat, **self.extra}


class ModelExecutor(ABC):
    """Runs the requests of one loaded model. Only the engine thread calls these methods, but `prepare`."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config

    def prepare(self, requests: Sequence[EngineRequest]) -> None:  # noqa: B027 - optional, empty by default
        """Any thread, before the requests are submitted: compute what can be computed outside the engine
        thread into `request.prepared` (the classifier tokenizes). Thread-safe; touches no executor state;
        may leave any request unprepared. The default prepares nothing."""

    @abstractmethod
    def add(self, request: EngineRequest) -> None:
        """Accept a request; it is scheduled by later `step()` calls (priority first, then arrival)."""

    @abstractmethod
    def abort(self, request_id: str, error: BaseException) -> bool:
        """Drop a request wherever it is, free what it holds, fail its future with `error`.

        Returns False if the executor does not hold this request."""

    @abstractmethod
    def has_work(self) -> bool:
        """True while any request is waiting or running."""

    @abstractmethod
    def step(self) -> None:
        """Run one batched model step under `config.max_batch_tokens`; complete finished requests.

        A failure that concerns one request fails that request's future only; an exception that
        escapes `step()` fails every request the executor holds (the engine loop does that)."""

    def stats(self) -> ModelStats:
        """What this executor reports (see `ModelStats`)."""
        return ModelStats()

    def work_done(self) -> int:
        """Tokens its steps have computed so far (cumulative; the engine divides a step's wall time by the
        difference to choose its intra-op threads: worker/engine/threads.py). 0: not counted."""
        return 0

    def planned_tokens(self) -> int | None:
        """Tokens its next step will compute, where it knows them before the step (the engine chooses the
        step's intra-op threads by its size: worker/engine/threads.py). None: not known (the default); the
        engine then goes by the size of its latest step."""
        return None

    def saturated(self) -> bool:
        """Whether its latest step could not have taken more: it ran at its request cap, or left requests
        waiting for a later step. The engine asks after each step, and chooses intra-op threads by measurement
        only after a saturated one (worker/engine/threads.py). The default reads `stats()` (requests waiting);
        executors override it with a cheap check."""
        return self.stats().num_requests_waiting > 0
