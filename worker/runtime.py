"""What one worker process holds: settings, registry, task records, the engine, its lease and reconciler.

Built by the `EngineStep` bootstep when the worker starts (after the process exists, so CUDA is safe),
and reached by tasks through `current_runtime(app)`.

One model never stops the others (`load_executors`): each registry model is loaded and its executor built
on its own. A model that fails is left out with ONE log line and its reason, and the worker serves the rest:
- refused (ValueError, NotImplementedError -- an executor's load-time self-check or an unsupported
  architecture -- or OSError, e.g. a missing file): an ERROR line with the reason, no traceback;
- anything else (a bug, an AttributeError from a config field a family lacks, out of memory): an ERROR line
  with the traceback.
A refused model stays in the registry (a request that names it is never served by another model) behind a
`RefusedExecutor`: its tasks fail with ModelNotFound naming the reason. `model_states()` (Flower's worker
info, `celery inspect stats`), the engine stats (`models.<name>.state`) and the worker's lease (`refused`)
say which models were refused and why.

If EVERY model fails, the worker refuses to start (RuntimeError listing each model's reason): Celery then
exits with an error instead of consuming messages it could only fail.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from celery import Celery

from pagedq.shared.errors import ModelNotFound
from pagedq.shared.models import TaskState
from pagedq.shared.records import LEASE_PREFIX, WORKER_RETRIES, Outcome, TaskRecords
from pagedq.shared.registry import ModelSpec, Registry
from pagedq.shared.settings import Settings
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor, ModelStats
from pagedq.worker.engine.lanes import EngineLanes
from pagedq.worker.engine.process import EngineProcess
from pagedq.worker.engine.service import make_executor
from pagedq.worker.group_commit import GroupCommit
from pagedq.worker.lease import WorkerLease, new_worker_id
from pagedq.worker.reconciler import Reconciler
from pagedq.worker.registry import load_model
from pagedq.worker.streaming import TokenStreamer

log = logging.getLogger(__name__)

#: exceptions that mean "this model is refused" (logged without a traceback); anything else is unexpected
REFUSALS: tuple[type[BaseException], ...] = (ValueError, NotImplementedError, OSError)


@dataclass
class WorkerRuntime:
    settings: Settings
    registry: Registry
    records: TaskRecords
    engine: EngineLanes | EngineProcess
    worker_id: str = ""
    lease: WorkerLease | None = None
    reconciler: Reconciler | None = None
    streamer: TokenStreamer | None = None
    #: ids this process's task threads are running now (claimed and not yet final or handed back); `take` adds
    inflight: set[str] = field(default_factory=set)
    #: registry models this worker does not serve -> why (see the module docstring)
    refused: dict[str, str] = field(default_factory=dict)
    _inflight_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: writes the final states of every task thread that finishes at about the same time in one call
    finalizer: GroupCommit[Outcome, TaskState | None] = field(init=False)
    #: held while a batch message's items are validated and prepared (tokenized) for the engine: messages that
    #: arrive together are prepared one after another, in about their arrival order, so the engine gets the
    #: first one's items after one message's worth of work instead of after all of them (the GIL runs one
    #: preparation at a time anyway; interleaved, they would all finish together, late)
    preparing: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.finalizer = GroupCommit(self.records.finalize_many)

    #: prefix of the lease keys `TaskRecords.claim` checks an owner's liveness with
    lease_prefix = LEASE_PREFIX

    @classmethod
    def start(cls, settings: Settings) -> WorkerRuntime:
        if settings.registry_path is None:
            raise RuntimeError("PAGEDQ_REGISTRY_PATH is not set: the worker needs a model registry file")
        registry = Registry.load(Path(settings.registry_path))
        engine: EngineLanes | EngineProcess
        if settings.engine_process:  # the models load and step in a process of their own
            engine = EngineProcess(settings, registry).start()
            refused = engine.refused
        else:
            engine, refused = start_engine(registry, settings)
        records = TaskRecords.from_url(settings.backend_url, settings.result_ttl_s, retries=WORKER_RETRIES)
        streamer = TokenStreamer(records.redis, settings.result_ttl_s).start()
        return cls(settings=settings, registry=registry, records=records, engine=engine, streamer=streamer,
                   refused=refused)

    def take(self, task_id: str) -> bool:
        """Mark `task_id` as running in this process; False if a task thread here runs it already. Two
        deliveries of one task can reach this worker at once (a message the reconciler restored and one it
        re-sent, taken in one read): their claims answer `run` and `mine`, and only one may run it -- the
        other would fail it on the engine's duplicate id."""
        with self._inflight_lock:
            if task_id in self.inflight:
                return False
            self.inflight.add(task_id)
            return True

    def model_states(self) -> dict[str, str]:
        """Each registry model's state: `loaded: <source>` or `refused: <reason>`."""
        return {
            name: f"refused: {self.refused[name]}" if name in self.refused
            else f"loaded: {self.registry.resolve_source(spec)}"
            for name, spec in self.registry.models.items()
        }

    def start_lease(self, app: Celery, hostname: str, held_tags: Callable[[], Iterable[str]]) -> None:
        """Take this process's lease and start the heartbeat, which also runs the engine watchdog and the
        reconciler. Call before the worker consumes: a claim names this worker's lease."""
        s = self.settings
        self.worker_id = new_worker_id(hostname)
        reconciler = Reconciler(app, self.records, self.worker_id, s.lease_ttl_s, s.reconcile_interval_s,
                                s.lost_message_grace_s)
        self.reconciler = reconciler
        self.lease = WorkerLease(
            self.records.redis, self.worker_id, hostname, s.lease_ttl_s, s.heartbeat_interval_s, held_tags,
            periodic=[(s.heartbeat_interval_s, self.engine.ensure_alive),
                      (s.reconcile_interval_s, reconciler.run_once),
                      (s.reconcile_interval_s, lambda: reconciler.recover_own(self.inflight))],
            ready=lambda: self.engine.alive,
            refused=self.refused,
            registry=self.registry.published(self.refused),
        ).start()

    def stop(self, drain_s: float = 0.0) -> None:
        """Drain the engine (in-flight requests get `drain_s` to finish; the rest are handed back), then give
        the lease up."""
        self.engine.stop(drain_s=drain_s)
        if self.lease is not None:
            self.lease.stop()
        if self.streamer is not None:
            self.streamer.stop()


def start_engine(registry: Registry, settings: Settings) -> tuple[EngineLanes, dict[str, str]]:
    """Load the registry's models (`load_executors`) and start their engine threads, a refused model behind a
    `RefusedExecutor`: (the engine, refused name -> why). RuntimeError if every model is refused."""
    executors, refused = load_executors(registry, settings.device, engine_config(settings))
    if len(refused) == len(registry.models):
        reasons = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
        raise RuntimeError(f"no model of the registry could be loaded, the worker does not start: {reasons}")
    stand_ins = {name: RefusedExecutor(registry.models[name], reason) for name, reason in refused.items()}
    return EngineLanes({**executors, **stand_ins}, per_model=settings.engine_threads == "per-model").start(), refused


#: net container allocations between two collections of the youngest generation (see `freeze_startup_heap`)
GC_GEN0_THRESHOLD = 100_000


def freeze_startup_heap() -> None:
    """Move everything built so far (the models, transformers, torch and Celery's own objects: millions of
    them) out of the cyclic garbage collector's reach (`gc.freeze`). Without it, every full collection walks
    them all: the allocations of one 2,000-text bulk triggered one that stopped every thread of the worker for
    ~0.3 s. They live as long as the process, so nothing is lost by never collecting them.

    Then the youngest generation is collected after `GC_GEN0_THRESHOLD` net container allocations instead of
    Python's 700: a busy worker allocates hundreds of thousands of short-lived objects a second (requests,
    futures, outcomes), which reference counting frees, and each young collection walks everything in flight.
    Measured on W5's 2,000-text bulks (2 vCPUs, per-pass times from `gc.callbacks`): ~600 young and ~55 middle
    collections per bulk in the engine core, 21 ms of it holding the GIL the engine thread steps with (12 ms in
    the Celery process), for ~5 objects found per collection. With 50,000, 5 young collections in 8 bulks
    (14 ms each: a pass walks what is in flight); with 100,000, none. Garbage in reference cycles still counts
    towards the threshold, so it is collected, after more of it (at most ~100,000 objects, tens of MB)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    log.info("pagedq: %d startup objects frozen out of the garbage collector", gc.get_freeze_count())


def load_executors(
    registry: Registry, device: str | None, config: EngineConfig
) -> tuple[dict[str, ModelExecutor], dict[str, str]]:
    """Load every registry model and build its executor, each on its own: (executors, refused name -> why)."""
    executors: dict[str, ModelExecutor] = {}
    refused: dict[str, str] = {}
    for name, spec in registry.models.items():
        try:
            executors[name] = _load_one(spec, registry, device, config)
        except REFUSALS as exc:
            refused[name] = _one_line(exc)
            log.error("model %s is refused and not served by this worker: %s", name, refused[name])
        except Exception as exc:  # noqa: BLE001 - one model must not stop the others
            refused[name] = _one_line(exc)
            log.exception("model %s failed to load and is not served by this worker: %s", name, refused[name])
    return executors, refused


def _load_one(spec: ModelSpec, registry: Registry, device: str | None, config: EngineConfig) -> ModelExecutor:
    loaded = load_model(spec, registry, device)
    return make_executor(loaded, model_config(spec, config))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


class RefusedExecutor(ModelExecutor):
    """Stands in for a model the worker refused: every request fails at once with ModelNotFound and the
    reason (the engine thread calls `add`, which completes the request's future; nothing is ever held)."""

    def __init__(self, spec: ModelSpec, reason: str) -> None:
        super().__init__(LoadedModel(spec=spec, model=None, tokenizer=None, device=None, dtype=None), EngineConfig())
        self.reason = reason

    def add(self, request: EngineRequest) -> None:
        name = self.loaded.spec.name
        request.fail(ModelNotFound(f"model {name!r} is not served by this worker: it was refused when the worker "
                                   f"loaded it ({self.reason})"))

    def abort(self, request_id: str, error: BaseException) -> bool:
        return False

    def has_work(self) -> bool:
        return False

    def step(self) -> None:
        return None

    def stats(self) -> ModelStats:
        return ModelStats(path="refused", path_reason=self.reason)


def engine_config(settings: Settings) -> EngineConfig:
    """The worker-wide engine knobs from its settings (`model_config` adds each registry entry's)."""
    return EngineConfig(
        max_batch_tokens=settings.max_batch_tokens,
        max_running_requests=settings.max_running_requests,
        kv_cache_bytes=settings.kv_cache_bytes,
        cpu_prepack_linear=settings.cpu_prepack_linear,
        intra_op_threads=settings.intra_op_threads,
    )


def model_config(spec: ModelSpec, config: EngineConfig) -> EngineConfig:
    """The worker's engine knobs with what one registry entry decides for its model (prefix caching, the KV
    cache's dtype, its steps' intra-op threads)."""
    return replace(
        config,
        enable_prefix_caching=config.enable_prefix_caching and spec.prefix_caching,
        kv_cache_dtype=spec.kv_cache_dtype,
        intra_op_threads=spec.intra_op_threads or config.intra_op_threads,
    )


def current_runtime(app: Celery) -> WorkerRuntime:
    runtime: WorkerRuntime | None = getattr(app, "pagedq_runtime", None)
    if runtime is None:
        raise RuntimeError("the pagedq engine is not running in this process (EngineStep did not start)")
    return runtime
