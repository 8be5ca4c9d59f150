"""What one worker process holds: settings, registry, task records, the engine, its lease and reconciler.

Built by the `EngineStep` bootstep when the worker starts (after the process exists, so CUDA is safe),
and reached by tasks through `current_runtime(app)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from shared.records import LEASE_PREFIX, WORKER_RETRIES, TaskRecords
from shared.registry import Registry
from shared.settings import Settings
from worker.engine.executor import EngineConfig
from worker.engine.service import Engine, make_executor
from worker.lease import WorkerLease, new_worker_id
from worker.reconciler import Reconciler
from worker.registry import load_model
from worker.streaming import TokenStreamer

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    settings: Settings
    registry: Registry
    records: TaskRecords
    engine: Engine
    worker_id: str = ""
    lease: WorkerLease | None = None
    reconciler: Reconciler | None = None
    streamer: TokenStreamer | None = None
    #: ids this process's task threads are running now (claimed and not yet final or handed back)
    inflight: set[str] = field(default_factory=set)

    #: prefix of the lease keys `TaskRecords.claim` checks an owner's liveness with
    lease_prefix = LEASE_PREFIX

    @classmethod
    def start(cls, settings: Settings) -> WorkerRuntime:
        if settings.registry_path is None:
            raise RuntimeError("PAGEDQ_REGISTRY_PATH is not set: the worker needs a model registry file")
        registry = Registry.load(Path(settings.registry_path))
        config = EngineConfig(
            max_batch_tokens=settings.max_batch_tokens,
            max_running_requests=settings.max_running_requests,
            kv_cache_bytes=settings.kv_cache_bytes,
            cpu_prepack_linear=settings.cpu_prepack_linear,
        )
        executors = {}
        for name, spec in registry.models.items():
            loaded = load_model(spec, registry, settings.device)
            spec_config = config if spec.prefix_caching else _without_prefix_cache(config)
            executors[name] = make_executor(loaded, spec_config)
        engine = Engine(executors).start()
        records = TaskRecords.from_url(settings.backend_url, settings.result_ttl_s, retries=WORKER_RETRIES)
        streamer = TokenStreamer(records.redis, settings.result_ttl_s).start()
        return cls(settings=settings, registry=registry, records=records, engine=engine, streamer=streamer)

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
        ).start()

    def stop(self, drain_s: float = 0.0) -> None:
        """Drain the engine (in-flight requests get `drain_s` to finish; the rest are handed back), then give
        the lease up."""
        self.engine.stop(drain_s=drain_s)
        if self.lease is not None:
            self.lease.stop()
        if self.streamer is not None:
            self.streamer.stop()


def _without_prefix_cache(config: EngineConfig) -> EngineConfig:
    from dataclasses import replace

    return replace(config, enable_prefix_caching=False)


def current_runtime(app: Celery) -> WorkerRuntime:
    runtime: WorkerRuntime | None = getattr(app, "pagedq_runtime", None)
    if runtime is None:
        raise RuntimeError("the pagedq engine is not running in this process (EngineStep did not start)")
    return runtime
