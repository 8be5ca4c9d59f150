"""Start the whole pagedq stack on one machine: Redis, one Celery worker, the HTTP API and Flower.

Used by `make demo`, `make up` (`python -m scripts.stack up`) and the integration tests. Every process
is a real child process; `Stack.stop()` ends everything it started, and only that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.celery_config import QUEUES, make_celery
from shared.redis_server import LocalRedis, free_port
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Stack:
    registry_path: Path
    redis_url: str | None = None  # None: start a private redis-server
    api_key: str = "demo-key"
    flower_auth: str = "admin:pagedq"
    log_dir: Path = field(default_factory=lambda: ROOT / ".demo" / "logs")
    worker_concurrency: int = 32
    extra_env: dict[str, str] = field(default_factory=dict)

    redis: LocalRedis | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api_port: int = 0
    flower_port: int = 0
    metrics_port: int = 0
    worker_count: int = 0

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

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
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
            self.redis = LocalRedis(appendonly=True).start()
            self.redis_url = self.redis.url
        self.start_worker()
        self.api_port = free_port()
        self._spawn("api", [str(BIN / "uvicorn"), "producer.api:app", "--host", "127.0.0.1",
                            "--port", str(self.api_port), "--log-level", "warning"])
        if flower:
            self.flower_port = free_port()
            self._spawn("flower", [str(BIN / "celery"), "-b", self.redis_url, "--result-backend", self.redis_url,
                                   "flower", f"--port={self.flower_port}", "--address=127.0.0.1",
                                   f"--basic-auth={self.flower_auth}"])
        self.wait_http(f"{self.api_url}/healthz", "api")
        self.wait_worker()
        if flower:
            self.wait_http(f"{self.flower_url}/healthcheck", "flower")
        return self

    def start_worker(self, env: dict[str, str] | None = None) -> str:
        """Start one more worker process (`env`: extra variables for it alone); returns its name."""
        self.worker_count += 1
        name = f"worker{self.worker_count}"
        self.metrics_port = free_port()
        env = {**self.env(), "PAGEDQ_METRICS_PORT": str(self.metrics_port), **(env or {})}
        self._spawn(name, [str(BIN / "celery"), "-A", "worker.app", "worker", "-P", "threads",
                           "-c", str(self.worker_concurrency), "-Q", ",".join(QUEUES.values()),
                           "-n", f"{name}@%h", "--loglevel", "INFO", "--without-mingle"], env)
        return name

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait(30)

    def wait_http(self, url: str, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not come up at {url}; see {self.log_dir / (name + '.log')}")

    def wait_worker(self, name: str | None = None, timeout_s: float = 180.0) -> None:
        """Wait until a worker (all, or `name`) answers a ping: its models are loaded and it consumes."""
        name = name or f"worker{self.worker_count}"
        app = make_celery(self.settings())
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self._check_alive(name)
                replies = app.control.ping(timeout=1.0) or []
                if any(next(iter(r)).startswith(f"{name}@") for r in replies):
                    return
            raise RuntimeError(f"{name} did not become ready; see {self.log_dir / (name + '.log')}")
        finally:
            app.close()

    def _check_alive(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is not None:
            tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM every process group we started (warm shutdown: workers drain first), SIGKILL what is left
        after the drain time and 10 s more."""
        procs, self.procs = list(self.procs.values()), {}
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings().drain_timeout_s + 10
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
