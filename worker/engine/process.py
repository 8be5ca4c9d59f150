"""The engine in a process of its own (`PAGEDQ_ENGINE_PROCESS=true`): the worker's Celery process keeps the
queue (consumer, task threads, claims, final writes, metrics) and an engine-core process steps the models, as
vLLM v1 splits its front end from its EngineCore.

Why: one Python process runs one thread at a time (the GIL). In a worker that both steps the models and
serves the queue, the engine thread held the GIL for its steps' Python (transformers' modules, the executor's
bookkeeping) and waited for it while the consumer and task threads ran theirs: measured on W5's bulk (2 vCPUs,
demo classifier), the engine thread was on a core ~53% of the run, the process as a whole ~1 core. Here each
process has its own GIL: the engine steps while the front end claims, validates and writes.

```
 Celery process (front end: EngineProcess)          engine-core process (`_core_main`)
 ─────────────────────────────────────────          ──────────────────────────────────────────────
 submit_many ── ("add", requests) ──── pipe ──────► EngineLanes.submit_many (prepare, engine threads)
 cancel ─────── ("cancel", id, error) ────────────► EngineLanes.cancel
 stats() ────── ("stats", n) ─────────────────────► the lanes' stats, answered in order with the rest
 stop(drain) ── ("stop", drain_s) ────────────────► EngineLanes.stop(drain_s), then ("stopped",)
 receiver thread ◄── ("out", [events]) ◄── pipe ─── sender thread: every completed future (its result or
   completes each request's future, feeds            error), stream opens and tokens, in the order the
   token streams to the TokenStreamer                engine produced them (a task's tokens before its end)
```

Each submitted request is keyed by a number of its own (two deliveries of one task id can be in flight), and
its future is completed exactly once: by the core's outcome, or -- when the core process dies -- with
WorkerShuttingDown, handed back to the queue. A dead core is started again by `ensure_alive` (the lease's
watchdog, or the next submission, as for a dead engine thread); the requests it held go back to the queue, as
the tasks of a worker process that dies do (the core's death is no fault of most of them). Inside the core every
`Engine` guarantee holds as in the worker process (one request cannot fail another, a dead engine thread is
restarted with its requests re-run).

The core loads the models (the front end loads none: only a tokenizer per model that streams tokens) and is
started with `spawn`, so CUDA is initialised in it alone. Its log lines go to the worker's stderr.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

from pagedq.shared.errors import EngineError, ModelNotFound, PagedqError, WorkerShuttingDown
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Settings
from pagedq.worker.engine.core.executor import CallbackFuture, EngineRequest, ModelStats
from pagedq.worker.engine.service import STOP_GRACE_S, submit_one

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0  # how long `stats()` waits for the core's answer before it returns the last one
START_TIMEOUT_S = 600.0  # how long the core may take to load its models
WATCHDOG_S = 1.0  # how often the core checks its engine threads (`EngineLanes.ensure_alive`)
#: executors that generate token by token and may stream: the front end decodes their tokens (TokenStreamer)
STREAMING_ARCHITECTURES = ("seq2seq", "causal-lm")


@dataclass
class _Core:
    """One started core process and what the front end knows of it."""

    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    stats: dict[str, Any] = field(default_factory=dict)
    model_stats: dict[str, ModelStats] = field(default_factory=dict)
    threads: dict[str, tuple[bool, int]] = field(default_factory=dict)
    alive: bool = True  # the core's engine threads, as of its latest stats answer
    #: set (under EngineProcess._lock) once its pipe ended: nothing is submitted to it any more
    stopped: threading.Event = field(default_factory=threading.Event)
    #: submitted and not completed yet, by key; the token callbacks of the streams it opened
    pending: dict[int, EngineRequest] = field(default_factory=dict)
    streams: dict[int, Callable[[str, int], None]] = field(default_factory=dict)


class EngineProcess:
    """`EngineLanes`' interface (submit_many, cancel, stats, model_stats, threads, alive, ensure_alive, stop)
    over an engine-core process (see the module docstring)."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings, self.registry = settings, registry
        self.executors: dict[str, None] = {}  # the names of the models the core serves (`submit_one` checks)
        self.refused: dict[str, str] = {}
        self.restarts = 0
        self._core: _Core | None = None
        self._tokenizers: dict[str, Any] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()  # orders submissions, the pending map, restarts and `stop`
        self._send_lock = threading.Lock()
        self._stats_reply = threading.Condition()
        self._stats_seq = 0
        self._stats_answered = 0
        self._stopping = False

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> EngineProcess:
        with self._lock:
            self._core = self._spawn()
        return self

    def _spawn(self) -> _Core:
        context = multiprocessing.get_context("spawn")
        here, there = context.Pipe()
        process = context.Process(target=_core_main, args=(there, self.settings, logging.getLogger().level),
                                  name="pagedq-engine-core", daemon=True)
        process.start()
        there.close()
        if not here.poll(START_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"the engine-core process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, *rest = here.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the engine-core process exited while it started (exit code "
                               f"{process.exitcode}; see its log above)") from exc
        if kind == "error":
            process.join(5)
            raise RuntimeError(rest[0])
        models, refused = rest
        core = _Core(process, here)
        self.executors = dict.fromkeys(models)
        self.refused = refused
        for name in models:  # loaded now, not when a stream opens: the receiver thread must not stall on it
            if name not in refused and self.registry.models[name].architecture in STREAMING_ARCHITECTURES:
                self._tokenizer(name)
        threading.Thread(target=self._receive, args=(core,), name="pagedq-engine-receiver", daemon=True).start()
        log.info("engine-core process %d serves %s", process.pid, sorted(models))
        return core

    def stop(self, drain_s: float = 0.0) -> None:
        """Refuse new requests; the core drains its in-flight ones for up to `drain_s` seconds and hands the
        rest back (WorkerShuttingDown), then exits."""
        with self._lock:
            self._stopping = True
            core = self._core
        if core is None:
            return
        if not core.stopped.is_set():
            self._send(core, ("stop", drain_s))
        if not core.stopped.wait(max(drain_s, 0.0) + STOP_GRACE_S):
            log.error("the engine-core process did not stop within %.0f s of the drain", STOP_GRACE_S)
        core.process.join(5)
        if core.process.is_alive():
            core.process.kill()
            core.process.join(5)
        self._end(core)

    @property
    def alive(self) -> bool:
        core = self._core
        return core is not None and not core.stopped.is_set() and core.process.is_alive() and core.alive

    def ensure_alive(self) -> bool:
        """Watchdog (the lease's heartbeat): start a new core if this one died while the worker was not
        stopping. Returns whether a core runs now."""
        with self._lock:
            core = self._core
            if core is not None and not core.stopped.is_set() and core.process.is_alive():
                return True
            if self._stopping:
                return False
            self.restarts += 1
            log.error("the engine-core process died (exit code %s); starting a new one",
                      core.process.exitcode if core is not None else None)
            self._core = self._spawn()
            return True

    # ---- requests ------------------------------------------------------------------------------------------
    def submit(self, request: EngineRequest) -> Future[Any]:
        return submit_one(self, request)

    def submit_many(self, requests: Sequence[EngineRequest]) -> None:
        """Hand the requests to the core in one message. A request for a model the core does not serve fails
        alone (ModelNotFound); WorkerShuttingDown or EngineError (no core) concern them all, nothing sent.

        Each future completes with the result's JSON form (`model_dump(mode="json")`, a dict: what the task
        stores), not the result model the in-process engine gives: a pydantic model pickled across the pipe and
        dumped here cost ~30 us a result on W5's bulk (2 vCPUs), the dict ~8 us, most of it in the core."""
        core = self._core
        if core is None or core.stopped.is_set():
            self.ensure_alive()  # a core that died is started again first (as a dead engine thread would be)
        sent = []
        with self._lock:
            if self._stopping:
                raise WorkerShuttingDown("the worker is shutting down; the task goes back to its queue")
            core = self._core
            if core is None or core.stopped.is_set():
                raise EngineError("the engine-core process is not running")
            for request in requests:
                if request.model not in self.executors:
                    request.fail(ModelNotFound(f"model {request.model!r} is not loaded on this worker"))
                    continue
                key = next(self._keys)
                core.pending[key] = request
                sent.append((key, request.id, request.task, request.payload, request.model, request.priority,
                             request.deadline, request.arrival, request.stream is not None))
            if sent:
                self._send(core, ("add", sent))

    def cancel(self, request_id: str, error: BaseException | None = None) -> None:
        core = self._core
        if core is not None:
            self._send(core, ("cancel", request_id, _picklable(error) if error is not None else None))

    # ---- stats ---------------------------------------------------------------------------------------------
    def _refresh(self) -> _Core | None:
        """Ask the core for its stats and wait for the answer (`STATS_TIMEOUT_S`: else the last one)."""
        core = self._core
        if core is None or core.stopped.is_set():
            return core
        with self._stats_reply:
            self._stats_seq += 1
            seq = self._stats_seq
        self._send(core, ("stats", seq))
        with self._stats_reply:
            self._stats_reply.wait_for(lambda: self._stats_answered >= seq or core.stopped.is_set(),
                                       STATS_TIMEOUT_S)
        return core

    def stats(self) -> dict[str, Any]:
        core = self._refresh()
        if core is None:
            return {"engine": {"alive": False, "process": True}, "models": {}}
        engine = {**core.stats.get("engine", {}), "alive": self.alive, "process": True,
                  "process_restarts": self.restarts, "pid": core.process.pid}
        return {"engine": engine, "models": core.stats.get("models", {})}

    def model_stats(self) -> dict[str, ModelStats]:
        core = self._refresh()
        return dict(core.model_stats) if core is not None else {}

    def threads(self) -> dict[str, tuple[bool, int]]:
        core = self._refresh()
        if core is None:
            return {}
        up = core.process.is_alive()
        return {name: (running and up, count) for name, (running, count) in core.threads.items()}

    # ---- the pipe ------------------------------------------------------------------------------------------
    def _send(self, core: _Core, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                core.conn.send(message)
        except (OSError, ValueError) as exc:  # the core died: the receiver fails what it held
            if message[0] == "add":
                raise EngineError(f"the engine-core process is not running ({exc!r})") from None
            log.warning("the engine-core process did not get %r: %r", message[0], exc)

    def _receive(self, core: _Core) -> None:
        """The receiver thread of one core: complete futures, feed streams, take stats, until the pipe ends."""
        try:
            while True:
                message = core.conn.recv()
                if message[0] == "out":
                    for event in message[1]:
                        self._event(core, event)
                elif message[0] == "stopped":
                    break
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a bug here must not leave futures waiting forever
            log.exception("the engine-core receiver failed")
        self._end(core)

    def _end(self, core: _Core) -> None:
        """The core's pipe ended: what it held goes back to the queue (WorkerShuttingDown)."""
        with self._lock:
            core.stopped.set()
            pending, core.pending = core.pending, {}
            core.streams.clear()
        core.conn.close()
        with self._stats_reply:
            self._stats_reply.notify_all()
        # handed back to the queue either way (the task is released and its message requeued, as when the whole
        # worker dies): the core's death is no fault of most of the requests it held
        error = WorkerShuttingDown("the worker stopped before this request finished; it goes back to its queue"
                                   if self._stopping else "the engine-core process died; the task goes back to "
                                   "its queue")
        for request in pending.values():
            request.fail(error)

    def _event(self, core: _Core, event: tuple[Any, ...]) -> None:
        kind, key = event[0], event[1]
        if kind == "done":
            request = core.pending.pop(key, None)
            core.streams.pop(key, None)
            if request is not None:
                _, _, result, request.first_token_at, finished_at = event
                request.finish(result, finished_at)
        elif kind == "fail":
            request = core.pending.pop(key, None)
            core.streams.pop(key, None)
            if request is not None:
                request.fail(event[2])
        elif kind == "open":
            request = core.pending.get(key)
            if request is not None and request.stream is not None:
                core.streams[key] = request.stream.open(self._tokenizer(request.model), event[2])
        elif kind == "token":
            on_token = core.streams.get(key)
            if on_token is not None:
                on_token(event[2], event[3])
        elif kind == "stats":
            _, seq, core.stats, core.model_stats, core.threads, core.alive = event
            with self._stats_reply:
                self._stats_answered = max(self._stats_answered, seq)
                self._stats_reply.notify_all()

    def _tokenizer(self, model: str) -> Any:
        """The model's tokenizer, for the token streams (decoded here: the TokenStreamer runs in this process)."""
        tokenizer = self._tokenizers.get(model)
        if tokenizer is None:
            from pagedq.worker.registry import load_tokenizer

            tokenizer = self._tokenizers[model] = load_tokenizer(self.registry.models[model], self.registry)
        return tokenizer


def _picklable(error: BaseException) -> BaseException:
    """`error`, or an EngineError that says what it was if it does not survive pickling."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception class may refuse
        return EngineError(f"{type(error).__name__}: {error}")


# ---- the engine-core process ---------------------------------------------------------------------------------
class _RemoteStream:
    """A streaming request's `stream` in the core: the executor opens it with its tokenizer; the tokens travel
    to the front end, whose TokenStreamer decodes and writes them."""

    def __init__(self, outbox: queue.SimpleQueue[tuple[Any, ...] | None], key: int) -> None:
        self.outbox, self.key = outbox, key

    def open(self, tokenizer: Any, stop: Sequence[str] = ()) -> Callable[[str, int], None]:
        self.outbox.put(("open", self.key, tuple(stop)))
        return lambda attempt, token: self.outbox.put(("token", self.key, attempt, int(token)))


def _completed(outbox: queue.SimpleQueue[tuple[Any, ...] | None], key: int, request: EngineRequest,
               future: Any) -> None:
    error = future.exception()
    if error is None:  # the result model as it is: the sender dumps it (`_wire`), off the engine thread
        outbox.put(("done", key, future.result(), request.first_token_at, request.finished_at))
    else:
        outbox.put(("fail", key, _picklable(error)))


def _wire(event: tuple[Any, ...]) -> tuple[Any, ...]:
    """An event as it crosses the pipe: a result as its JSON form (`model_dump(mode="json")`, see
    `EngineProcess.submit_many`), dumped in the sender thread -- in the engine thread's completion callback it
    cost the step ~4 us a request -- and a result that cannot be dumped fails its request alone."""
    if event[0] != "done":
        return event
    try:
        return ("done", event[1], event[2].model_dump(mode="json"), *event[3:])
    except Exception as exc:  # noqa: BLE001 - a bug in a result model fails that request, not the sender
        log.exception("the result of request %s cannot be sent", event[1])
        return ("fail", event[1], EngineError(f"the result cannot be sent: {type(exc).__name__}: {exc}"))


def _sender(conn: Connection, outbox: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
    """Send every event in order, as many per message as are waiting."""
    while True:
        event = outbox.get()
        events = []
        while event is not None:
            events.append(_wire(event))
            try:
                event = outbox.get_nowait()
            except queue.Empty:
                break
        if events:
            conn.send(("out", events))
        if event is None:
            return


def _core_main(conn: Connection, settings: Settings, log_level: int) -> None:
    """The engine-core process: load the models, run their engine threads, serve the front end's messages."""
    # stopped by the front end through the pipe (a warm shutdown drains first), or by the pipe's end when the
    # worker process is gone -- not by the signals a terminal or a supervisor sends the worker's process group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level or logging.WARNING,
                        format="[%(asctime)s: %(levelname)s/engine-core %(process)d] %(name)s: %(message)s")
    from pathlib import Path

    from pagedq.worker.runtime import freeze_startup_heap, start_engine

    try:
        lanes, refused = start_engine(Registry.load(Path(str(settings.registry_path))), settings)
    except RuntimeError as exc:  # every model refused
        conn.send(("error", str(exc)))
        return
    freeze_startup_heap()
    outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    conn.send(("ready", sorted(lanes.executors), refused))
    sender = threading.Thread(target=_sender, args=(conn, outbox), name="pagedq-core-sender", daemon=True)
    sender.start()
    stopped = threading.Event()
    threading.Thread(target=_watchdog, args=(lanes, stopped), name="pagedq-core-watchdog", daemon=True).start()

    def stop(drain_s: float) -> None:
        lanes.stop(drain_s=drain_s)
        stopped.set()
        outbox.put(None)  # the sender sends what is left, then ends
        sender.join()
        conn.send(("stopped",))  # the sender has ended: the pipe is this thread's

    stopper: threading.Thread | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the front end closed the pipe (after "stopped"), or its process is gone
            if stopper is None:
                lanes.stop(drain_s=0.0)
            else:
                stopper.join()
            return
        kind = message[0]
        if kind == "add":
            _add(lanes, outbox, message[1])
        elif kind == "cancel":
            lanes.cancel(message[1], message[2])
        elif kind == "stats":  # in order with the events: a reader of stats has seen their futures complete
            outbox.put(("stats", message[1], lanes.stats(), lanes.model_stats(), lanes.threads(), lanes.alive))
        elif kind == "stop" and stopper is None:
            stopper = threading.Thread(target=stop, args=(message[1],), name="pagedq-core-stop")
            stopper.start()


def _add(lanes: Any, outbox: queue.SimpleQueue[tuple[Any, ...] | None], specs: list[tuple[Any, ...]]) -> None:
    requests = []
    for key, request_id, task, payload, model, priority, deadline, arrival, stream in specs:
        request = EngineRequest(id=request_id, task=task, payload=payload, model=model, priority=priority,
                                deadline=deadline, arrival=arrival, future=cast("Future[Any]", CallbackFuture()))
        if stream:
            request.stream = _RemoteStream(outbox, key)
        request.future.add_done_callback(functools.partial(_completed, outbox, key, request))
        requests.append(request)
    try:
        lanes.submit_many(requests)
    except PagedqError as exc:  # stopping, or the engine does not run: each request fails with it
        for request in requests:
            request.fail(exc)


def _watchdog(lanes: Any, stopped: threading.Event) -> None:
    while not stopped.wait(WATCHDOG_S):
        lanes.ensure_alive()
