"""Start the whole pagedq stack on one machine: Redis, one Celery worker, the HTTP API and Flower.

Used by `make demo`, `make up` and the integration tests. Every process is a real child process in its own
session (the terminal's Ctrl-C reaches only the launcher); `Stack.stop()` ends everything it started, and
only that, in dependency order: API and Flower, then the workers (warm shutdown), then Redis.
Ports left at 0 are picked free (tests, `make demo`); `make up` passes fixed ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pagedq.shared.celery_config import QUEUES, make_celery
from pagedq.shared.redis_server import LocalRedis, free_port
from pagedq.shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: While waiting for a process, say so again this often (with the last line of its log).
PROGRESS_EVERY_S = 10.0


def quiet(message: str) -> None:
    """The default progress reporter: tests want no output."""


@dataclass
class Stack:
    registry_path: Path
    redis_url: str | None = None  # None: start a private redis-server (on `redis_port`)
    api_key: str = "demo-key"
    flower_auth: str = "admin:pagedq"
    log_dir: Path = field(default_factory=lambda: ROOT / ".demo" / "logs")
    worker_concurrency: int = 32
    worker_loglevel: str = "INFO"  # INFO logs a line as each task is received and as it ends
    extra_env: dict[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] = quiet  # told what is being started and waited for

    redis: LocalRedis | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    redis_port: int = 0  # each port: 0 = a free one; metrics_port: the first worker's
    api_port: int = 0
    flower_port: int = 0
    metrics_port: int = 0
    worker_count: int = 0
    _first_metrics_port: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._first_metrics_port = self.metrics_port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def env(self) -> dict[str, str]:
        assert self.redis_url is not None
        return {**os.environ, "PAGEDQ_REDIS_URL": self.redis_url, "PAGEDQ_REGISTRY_PATH": str(self.registry_path),
                "PAGEDQ_API_KEYS": self.api_key, "PAGEDQ_AUTH_ENABLED": "true", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", **self.extra_env}

    def settings(self) -> Settings:
        return Settings(redis_url=self.redis_url, registry_path=self.registry_path, api_keys=[self.api_key])

    def log_path(self, name: str) -> Path:
        if name == "redis" and self.redis is not None:
            return Path(self.redis.dir) / "redis.log"  # removed with its data when Redis is stopped
        return self.log_dir / f"{name}.log"

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(args, cwd=ROOT, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self, flower: bool = True) -> Stack:
        """Start everything; if any part fails to come up, stop what was started and re-raise."""
        try:
            return self._start(flower)
        except BaseException:
            self.stop()
            raise

    def _start(self, flower: bool) -> Stack:
        if self.redis_url is None:
            self.redis = LocalRedis(port=self.redis_port or None, appendonly=True, new_session=True).start()
            self.redis_port, self.redis_url = self.redis.port, self.redis.url
            self.progress(f"Redis is up on port {self.redis_port}.")
        worker = self.start_worker()
        self.api_port = self.api_port or free_port()
        self._spawn("api", [str(BIN / "uvicorn"), "pagedq.producer.api:app", "--host", "127.0.0.1",
                            "--port", str(self.api_port), "--log-level", "warning"])
        if flower:
            self.flower_port = self.flower_port or free_port()
            self._spawn("flower", [str(BIN / "celery"), "-b", self.redis_url, "--result-backend", self.redis_url,
                                   "flower", f"--port={self.flower_port}", "--address=127.0.0.1",
                                   f"--basic-auth={self.flower_auth}"])
        self.progress(f"Started {worker}, the API{' and Flower' if flower else ''}; waiting for them ...")
        self.wait_http(f"{self.api_url}/healthz", "api")
        self.wait_worker()
        if flower:
            self.wait_http(f"{self.flower_url}/healthcheck", "flower")
        return self

    def start_worker(self, env: dict[str, str] | None = None) -> str:
        """Start one more worker process (`env`: extra variables for it alone); returns its name."""
        self.worker_count += 1
        name = f"worker{self.worker_count}"
        self.metrics_port = (self.worker_count == 1 and self._first_metrics_port) or free_port()
        env = {**self.env(), "PAGEDQ_METRICS_PORT": str(self.metrics_port), **(env or {})}
        self._spawn(name, [str(BIN / "celery"), "-A", "pagedq.worker.app", "worker", "-P", "threads",
                           "-c", str(self.worker_concurrency), "-Q", ",".join(QUEUES.values()),
                           "-n", f"{name}@%h", "--loglevel", self.worker_loglevel, "--without-mingle"], env)
        return name

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait(30)

    def wait_http(self, url: str, name: str, timeout_s: float = 60.0) -> None:
        waiting = Waiting(self, name)
        while waiting.seconds() < timeout_s:
            self._check_alive(name)
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    waiting.done()
                    return
            except httpx.HTTPError:
                pass
            waiting.tick()
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not come up at {url}; see {self.log_path(name)}")

    def wait_worker(self, name: str | None = None, timeout_s: float = 180.0) -> None:
        """Wait until a worker (all, or `name`) answers a ping: its models are loaded and it consumes."""
        name = name or f"worker{self.worker_count}"
        app = make_celery(self.settings())
        waiting = Waiting(self, name, "loading its models")
        try:
            while waiting.seconds() < timeout_s:
                self._check_alive(name)
                replies = app.control.ping(timeout=1.0) or []
                if any(next(iter(r)).startswith(f"{name}@") for r in replies):
                    waiting.done()
                    return
                waiting.tick()
            raise RuntimeError(f"{name} did not become ready; see {self.log_path(name)}")
        finally:
            app.close()

    def _check_alive(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def exited(self) -> dict[str, int]:
        """Children that have exited since they were started, with their exit codes (negative: the signal);
        polling reaps them, so none is left a zombie."""
        codes = {name: proc.poll() for name, proc in self.procs.items()}
        if self.redis is not None and self.redis.proc is not None:
            codes["redis"] = self.redis.proc.poll()
        return {name: code for name, code in codes.items() if code is not None}

    def stop(self) -> None:
        """Stop in dependency order: SIGTERM to the API and Flower, then to the workers (warm shutdown: they
        drain while Redis is still there), then Redis. A process still alive after its grace time (workers:
        the drain time and 10 s more) is SIGKILLed."""
        procs, self.procs = self.procs, {}
        workers = {n: p for n, p in procs.items() if n.startswith("worker")}
        others = {n: p for n, p in procs.items() if n not in workers}
        self._terminate(others, 10.0)
        drain_s = float(self.extra_env.get("PAGEDQ_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
        self._terminate(workers, drain_s + 10, "warm shutdown: in-flight tasks finish")
        if self.redis is not None:
            self.progress("Stopping Redis ...")
            self.redis.stop()
            self.redis = None

    def _terminate(self, procs: dict[str, subprocess.Popen[bytes]], grace_s: float, why: str = "") -> None:
        alive = {n: p for n, p in procs.items() if p.poll() is None}
        if alive:
            self.progress(f"Stopping {', '.join(alive)}{f' ({why}, up to {grace_s:.0f} s)' if why else ''} ...")
        for proc in alive.values():
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.progress(f"{name} did not stop within {grace_s:.0f} s: SIGKILL")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Waiting:
    """Progress while the stack waits for one process: a line now and then with the last line of its log."""

    def __init__(self, stack: Stack, name: str, doing: str = "") -> None:
        self.stack, self.name, self.doing = stack, name, doing
        self.started = self.said = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def tick(self) -> None:
        if time.monotonic() - self.said < PROGRESS_EVERY_S:
            return
        self.said = time.monotonic()
        lines = [line for line in self.stack.log_tail(self.name, 2000).replace("\r", "\n").splitlines() if line]
        last = f" | {lines[-1].strip()[:120]}" if lines else ""
        doing = f"{self.doing}, " if self.doing else ""
        self.stack.progress(f"  still waiting for {self.name} ({doing}{self.seconds():.0f} s){last}")

    def done(self) -> None:
        self.stack.progress(f"  {self.name} is ready ({self.seconds():.1f} s).")
