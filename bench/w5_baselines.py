"""W5 baselines through Celery: a private Redis plus one plain Celery worker, and the clients that load it.

`BaselineWorker` starts what `scripts.stack.Stack` starts for pagedq -- a private `redis-server` (AOF on) and
`celery -A <module> worker -P threads -c N` -- for `w5_noop_worker` (Celery's ceiling) or `w5_naive_worker`
(transformers one request at a time). Clients are plain Celery: `send_task(...).get()`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

from redis_delay import DelayedRedis
from w5_load import Outcome, Sample
from w5_naive_worker import TASKS as NAIVE_TASKS
from w5_noop_worker import NOOP_TASK, make_app
from w5_workload import Job

from pagedq.shared.celery_config import make_celery
from pagedq.shared.redis_server import LocalRedis
from pagedq.shared.settings import Settings

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CELERY = Path(sys.executable).parent / "celery"
STOP_TIMEOUT_S = 30.0


class BaselineWorker:
    """A private Redis and one Celery worker process running `module` (a module in bench/)."""

    def __init__(self, module: str, concurrency: int, registry_path: Path, log_dir: Path,
                 redis_delay_ms: float = 0.0, extra_env: dict[str, str] | None = None, name: str = "") -> None:
        self.module, self.concurrency, self.registry_path, self.log_dir = module, concurrency, registry_path, log_dir
        self.redis_delay_ms = redis_delay_ms  # > 0: everything reaches the Redis through a `DelayedRedis`
        self.extra_env = extra_env or {}
        self.name = name or module  # its log file and Celery node name
        self.redis: LocalRedis | None = None
        self.proxy: DelayedRedis | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.redis is not None, "not started"
        return self.proxy.url if self.proxy is not None else self.redis.url

    def pids(self) -> dict[str, int]:
        assert self.proc is not None, "not started"
        return {"worker": self.proc.pid}

    def settings(self) -> Settings:
        return Settings(redis_url=self.url, registry_path=self.registry_path)

    def start(self, timeout_s: float = 180.0) -> BaselineWorker:
        self.redis = LocalRedis(appendonly=True).start()
        if self.redis_delay_ms > 0:
            self.proxy = DelayedRedis(self.redis.port, self.redis_delay_ms).start()
        env = {
            **os.environ,
            "PAGEDQ_REDIS_URL": self.url,
            "PAGEDQ_REGISTRY_PATH": str(self.registry_path),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **self.extra_env,
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [str(CELERY), "-A", self.module, "worker", "-P", "threads", "-c", str(self.concurrency),
             "-n", f"{self.name}@%h", "--loglevel", "WARNING", "--without-mingle"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        app = make_celery(self.settings())
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited; see {self.log_dir / (self.name + '.log')}")
                if app.control.ping(timeout=1.0):
                    return
            raise RuntimeError(f"{self.name} did not answer a ping within {timeout_s} s")
        finally:
            app.close()

    def stop(self) -> None:
        """SIGTERM the worker's process group (warm shutdown), SIGKILL after `STOP_TIMEOUT_S`; stop Redis."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> BaselineWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def noop_client(settings: Settings, timeout_s: float) -> Iterator[Callable[[str], Any]]:
    """One closed-loop client of the no-op task: its payload is the text a classify task would carry."""
    app = make_app(settings, main="w5-noop-client")
    try:
        yield lambda text: app.send_task(NOOP_TASK, args=[text]).get(timeout=timeout_s)
    finally:
        app.close()


@contextmanager
def naive_client(settings: Settings, timeout_s: float) -> Iterator[Callable[[Job], Any]]:
    """One closed-loop client of the naive worker: each job is one task of its kind."""
    app = make_app(settings, main="w5-naive-client")
    try:
        yield lambda job: app.send_task(NAIVE_TASKS[job.kind], kwargs=job.fields).get(timeout=timeout_s)
    finally:
        app.close()


def noop_open_loop(settings: Settings, texts: Sequence[str], timeout_s: float) -> Outcome:
    """Submit every no-op task from one client, then wait for each. Latency: submission to the worker's
    `date_done` (what a client polling each result would see first), not to this loop's `get`."""
    app = make_app(settings, main="w5-noop-open")
    try:
        start = time.perf_counter()
        sent = [(time.time(), app.send_task(NOOP_TASK, args=[text])) for text in texts]
        samples, failures = [], []
        for submitted, result in sent:
            try:
                result.get(timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - counted
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            done = result.date_done
            done_s = (done if done.tzinfo else done.replace(tzinfo=UTC)).timestamp() if done else time.time()
            samples.append(Sample(max(0.0, done_s - submitted)))
        return Outcome(time.perf_counter() - start, samples, failures)
    finally:
        app.close()
