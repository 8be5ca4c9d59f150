"""A peer engine in its own process, as its users run it: built and called there, timed from here.

Why: CTranslate2's wheel bundles its own copy of libgomp, and once a CTranslate2 call has run in a process,
torch's OpenMP worker threads in that process stop keeping pace (measured on the 2-core VM, W1, pagedq int8
with bf16 K/V, 64 requests: 1,015-1,173 tok/s before any CTranslate2 call, 734-819 after one, every later run
too; the OpenMP worker thread's share of the CPU fell from ~50% to ~38%; with CTranslate2 in a child process,
1,032-1,143 tok/s after each of its runs). No deployment runs the two engines in one process, and a benchmark
that did measured the interaction, not pagedq. ONNX Runtime keeps its own thread pools and showed no such
effect on W3 (pagedq int8 18.4 texts/s before the ORT sessions ran, 20.3-20.8 after): W3 keeps it in-process.

`PeerProcess(build, *args)` starts a `spawn` child (a fresh interpreter: nothing of this process's OpenMP
state), calls `build(*args)` there and waits until it returns (its error re-raised here, with the child's
traceback). `call(method, *args)` runs `peer.method(*args)` in the child and returns its (pickled) result; the
caller times the call as it times an in-process system (a pipe round trip is ~0.1 ms against runs of
seconds). `cpu_seconds()` is the child's CPU time so far (/proc), so the tables' tokens per CPU-second count the
peer's own process. `close()` ends the child; it is a daemon, so it also ends with this process.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")


class PeerError(RuntimeError):
    """The peer's build or call raised in the child (the message holds its traceback)."""


class PeerProcess:
    """One peer object living in a child process (module docstring)."""

    def __init__(self, build: Callable[..., Any], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_serve, args=(child, build, args), daemon=True)
        self._proc.start()
        child.close()
        self._answer()  # built (or its error raised here)

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    def call(self, method: str, *args: Any) -> Any:
        """`peer.method(*args)` in the child; its result."""
        self._conn.send((method, args))
        return self._answer()

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the child so far (its every thread)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()

    def _answer(self) -> Any:
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise PeerError(f"the peer process exited (code {self._proc.exitcode})") from None
        if not ok:
            raise PeerError(f"in the peer process:\n{value}")
        return value


def _serve(conn: Connection, build: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        peer = build(*args)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send((False, traceback.format_exc()))
        return
    conn.send((True, None))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        method, args = request
        try:
            conn.send((True, getattr(peer, method)(*args)))
        except Exception:  # noqa: BLE001 - one failed call is the caller's to handle
            conn.send((False, traceback.format_exc()))
