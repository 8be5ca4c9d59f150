"""A worker process's lease: a heartbeat in Redis that says "I am alive, and these messages are mine".

Every `heartbeat_interval_s` one pipeline writes:

    pagedq:lease:<worker id>   expires after lease_ttl_s     the lease (hostname, pid, ready: engine running,
                                                             refused: registry models not served here -> why,
                                                             registry: what it serves, `Registry.published`:
                                                             producers validate requests against it)
    pagedq:workers             zset worker id -> last beat   every worker the reconciler must watch
    pagedq:held:<worker id>    set of delivery tags          messages this process holds, unacked

A worker that stops beating (SIGKILL, OOM, a lost host) loses its lease within `lease_ttl_s`; the reconciler
(worker/reconciler.py, in every worker) then hands its tasks back at once instead of waiting for the
broker's visibility timeout. The worker id is unique per process (hostname, pid, a nonce), so a restarted
worker never inherits its predecessor's lease.

The heartbeat thread also runs the engine watchdog and the reconciler, so one thread does all periodic work.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping

import redis

from pagedq.shared.records import LEASE_PREFIX, WORKERS_KEY

log = logging.getLogger(__name__)

HELD_PREFIX = "pagedq:held:"


def new_worker_id(hostname: str) -> str:
    return f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class WorkerLease:
    """The heartbeat thread of one worker process (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        worker_id: str,
        hostname: str,
        lease_ttl_s: float,
        interval_s: float,
        held_tags: Callable[[], Iterable[str]] = lambda: (),
        periodic: Iterable[tuple[float, Callable[[], object]]] = (),
        ready: Callable[[], bool] = lambda: True,
        refused: Mapping[str, str] | None = None,
        registry: Mapping[str, object] | None = None,
    ) -> None:
        self.redis = client
        self.worker_id = worker_id
        self.hostname = hostname
        self.lease_ttl_s = lease_ttl_s
        self.interval_s = interval_s
        self.held_tags = held_tags
        self.ready = ready
        self.refused = dict(refused or {})
        self.registry = dict(registry or {})
        self._periodic = [[every, 0.0, fn] for every, fn in periodic]  # (every s, last run, fn)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedq-lease", daemon=True)

    def start(self) -> WorkerLease:
        self.beat()  # the lease exists before the first message is consumed
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and give the lease up (a clean exit: nothing of ours is left to recover)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(LEASE_PREFIX + self.worker_id, HELD_PREFIX + self.worker_id)
                pipe.execute()
        except redis.RedisError:
            log.warning("could not remove the lease of %s (it expires by itself)", self.worker_id)

    def beat(self) -> None:
        ttl_ms = int(self.lease_ttl_s * 1000)
        info = json.dumps({"hostname": self.hostname, "pid": os.getpid(), "at": time.time(), "ready": self.ready(),
                           "refused": self.refused, "registry": self.registry})
        tags = [str(t) for t in self.held_tags()]
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(LEASE_PREFIX + self.worker_id, info, px=ttl_ms)
            pipe.zadd(WORKERS_KEY, {self.worker_id: time.time()})
            pipe.delete(HELD_PREFIX + self.worker_id)
            if tags:
                pipe.sadd(HELD_PREFIX + self.worker_id, *tags)
                pipe.pexpire(HELD_PREFIX + self.worker_id, ttl_ms)
            pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError as exc:  # Redis restarting: keep trying, the lease expires meanwhile
                log.warning("heartbeat failed: %s", exc)
                continue
            self._run_periodic()

    def _run_periodic(self) -> None:
        now = time.monotonic()
        for entry in self._periodic:
            every, last, fn = entry
            if now - float(last) < float(every):  # type: ignore[arg-type]
                continue
            entry[1] = now
            try:
                fn()  # type: ignore[operator]
            except redis.RedisError as exc:
                log.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)
            except Exception:  # noqa: BLE001 - periodic work must never stop the heartbeat
                log.exception("%s failed", getattr(fn, "__name__", fn))
