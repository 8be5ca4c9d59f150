"""The worker's engine loop (worker/engine/service.py, isolation.py): batching hand-off, deadlines,
cancellation, failure isolation (a request that breaks its model fails alone), the watchdog and drain on stop.

The first tests use a minimal in-test executor so the loop's own guarantees are tested exactly; the later
ones run the real executors over the tiny demo models and compare every innocent request's result with a
run without the poison."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedq.shared.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    ModelError,
    ModelNotFound,
    TaskCancelled,
    WorkerShuttingDown,
)
from pagedq.shared.models import ClassifyRequest, GenerationOptions, QARequest, TaskType, TranslateRequest
from pagedq.shared.registry import ModelSpec, Registry
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor, ModelStats
from pagedq.worker.engine.service import Engine, make_executor
from pagedq.worker.registry import load_model
from pagedq.worker.runtime import model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POISON = "poison"  # the text of a request that breaks BatchingExecutor's step


class Killer(BaseException):
    """Not an Exception: what the engine loop cannot catch per step, so it ends the thread."""


class BatchingExecutor(ModelExecutor):
    """Completes every waiting request in one step (a batch), unless it is told to hold or to fail.

    A batch that holds a request with the text POISON raises RuntimeError (or `Killer` with `kill_on_poison`);
    a request with the text "bad add" makes `add` raise."""

    def __init__(self, name: str) -> None:
        spec = ModelSpec(name=name, task=TaskType.CLASSIFY, source="none")
        super().__init__(LoadedModel(spec, None, None, "cpu", None), EngineConfig())
        self.waiting: dict[str, EngineRequest] = {}
        self.batches: list[list[str]] = []
        self.hold = False
        self.fail_next = False
        self.kill_next = False
        self.kill_on_poison = False
        self.step_s = 0.0

    def add(self, request: EngineRequest) -> None:
        text = request.payload.text  # type: ignore[union-attr]
        if text == "bad add":
            raise UnicodeEncodeError("utf-8", text, 0, 1, "surrogates not allowed")
        if text == "invalid add":
            raise InvalidRequest("too long")
        self.waiting[request.id] = request

    def abort(self, request_id: str, error: BaseException) -> bool:
        request = self.waiting.pop(request_id, None)
        return request is not None and request.fail(error)

    def has_work(self) -> bool:
        return bool(self.waiting)

    def step(self) -> None:
        time.sleep(self.step_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        if self.kill_next:
            self.kill_next = False
            raise Killer("thread killed in a test")
        if any(r.payload.text == POISON for r in self.waiting.values()):  # type: ignore[union-attr]
            raise Killer("poisoned batch") if self.kill_on_poison else RuntimeError("poisoned batch")
        if self.hold:
            time.sleep(0.01)
            return
        batch, self.waiting = self.waiting, {}
        self.batches.append(list(batch))
        for request in batch.values():
            request.finish(f"done:{request.id.partition('@')[0]}")  # the id the caller gave (not a re-run's)

    def stats(self) -> ModelStats:
        return ModelStats(num_requests_waiting=len(self.waiting), steps=len(self.batches))


def request(rid: str, model: str = "m", deadline: float | None = None, text: str = "x") -> EngineRequest:
    return EngineRequest(
        id=rid, task=TaskType.CLASSIFY, payload=ClassifyRequest(text=text), model=model, deadline=deadline
    )


def outcome(future: Any, timeout: float = 10) -> Any:
    """The future's result, or the exception it failed with."""
    try:
        return future.result(timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        return exc


def wait_until_dead(engine: Any, timeout_s: float = 5) -> None:
    """Until `engine.alive` is False (a thread killed by the test has ended)."""
    deadline = time.monotonic() + timeout_s
    while engine.alive:
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.fixture()
def engine() -> Any:
    executors = {"m": BatchingExecutor("m"), "other": BatchingExecutor("other")}
    eng = Engine(executors).start()
    yield eng
    eng.stop()


def test_requests_in_flight_together_share_a_step(engine: Engine) -> None:
    ex = engine.executors["m"]
    ex.hold = True
    futures = [engine.submit(request(f"r{i}")) for i in range(10)]
    time.sleep(0.1)
    ex.hold = False
    assert [f.result(timeout=5) for f in futures] == [f"done:r{i}" for i in range(10)]
    assert len(ex.batches) == 1 and len(ex.batches[0]) == 10


def test_unknown_model_is_refused_at_submit(engine: Engine) -> None:
    with pytest.raises(ModelNotFound):
        engine.submit(request("x", model="missing"))


def test_submit_many_hands_over_together_and_an_unknown_model_fails_alone(engine: Engine) -> None:
    ex = engine.executors["m"]
    ex.hold = True
    reqs = [request("a"), request("b", model="missing"), request("c")]
    engine.submit_many(reqs)
    with pytest.raises(ModelNotFound):
        reqs[1].future.result(timeout=5)
    ex.hold = False
    assert [reqs[0].future.result(timeout=5), reqs[2].future.result(timeout=5)] == ["done:a", "done:c"]
    assert [sorted(b) for b in ex.batches] == [["a", "c"]]


def test_deadline_expires_a_waiting_request(engine: Engine) -> None:
    engine.executors["m"].hold = True
    future = engine.submit(request("late", deadline=time.time() + 0.2))
    with pytest.raises(DeadlineExceeded):
        future.result(timeout=5)
    assert "late" not in engine.executors["m"].waiting


def test_deadlines_among_many_flights_expire_only_the_late_ones(engine: Engine) -> None:
    """The loop keeps deadlines in a heap and reaps by completion (it must not scan every flight per
    iteration: a bulk keeps thousands in flight): only the requests whose deadline passed expire."""
    engine.executors["m"].hold = True
    now = time.time()
    patient = [engine.submit(request(f"p{i}", deadline=now + 60)) for i in range(500)]
    late = [engine.submit(request(f"l{i}", deadline=now + 0.1 + i / 100)) for i in range(5)]
    no_deadline = engine.submit(request("n"))
    for future in late:
        assert isinstance(outcome(future), DeadlineExceeded)
    assert not any(f.done() for f in patient) and not no_deadline.done()
    engine.executors["m"].hold = False
    assert [outcome(f) for f in patient[:3]] == ["done:p0", "done:p1", "done:p2"]
    assert outcome(no_deadline) == "done:n"
    _until(lambda: engine.stats()["engine"]["requests_finished"] >= 501)


def test_a_finished_id_submitted_again_runs_again(engine: Engine) -> None:
    """A redelivered task reuses its id: the new flight must not be reaped as the old, finished one (it
    would then escape cancels and deadlines)."""
    assert outcome(engine.submit(request("again"))) == "done:again"
    engine.executors["m"].hold = True
    second = engine.submit(request("again", deadline=time.time() + 60))
    time.sleep(0.1)  # several loop iterations with the new flight in place
    engine.cancel("again")
    assert isinstance(outcome(second), TaskCancelled)


def _until(check: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_cancel_frees_the_request(engine: Engine) -> None:
    engine.executors["m"].hold = True
    future = engine.submit(request("c"))
    time.sleep(0.05)
    engine.cancel("c")
    with pytest.raises(TaskCancelled):
        future.result(timeout=5)
    assert not engine.executors["m"].waiting


def test_a_failing_step_fails_only_that_models_requests(engine: Engine) -> None:
    bad, good = engine.executors["m"], engine.executors["other"]
    bad.hold = good.hold = True
    doomed = engine.submit(request("d1"))
    fine = engine.submit(request("f1", model="other"))
    time.sleep(0.05)
    bad.fail_next, bad.hold, good.hold = True, False, False
    with pytest.raises(ModelError, match="RuntimeError: boom"):  # alone in its step: the guilty one
        doomed.result(timeout=5)
    assert fine.result(timeout=5) == "done:f1"
    assert engine.alive
    assert engine.submit(request("after")).result(timeout=5) == "done:after"
    assert engine.stats()["engine"]["step_errors"] == 1


def test_a_poison_fails_alone_and_its_batch_companions_finish(engine: Engine) -> None:
    ex = engine.executors["m"]
    ex.hold = True
    ids = [f"r{i}" for i in range(9)]
    futures = {rid: engine.submit(request(rid, text=POISON if rid == "r5" else "x")) for rid in ids}
    time.sleep(0.1)
    ex.hold = False
    results = {rid: outcome(f) for rid, f in futures.items()}
    poison = results.pop("r5")
    assert isinstance(poison, ModelError) and str(poison) == "RuntimeError: poisoned batch"
    assert results == {rid: f"done:{rid}" for rid in results}
    stats = engine.stats()["engine"]
    assert stats["isolated_requests"] == 1 and stats["step_errors"] >= 2 and stats["alive"]
    # bisection: every batch after the failure is a part of one group, never the whole set again
    assert all(len(batch) <= 5 for batch in ex.batches) and sum(map(len, ex.batches)) == 8


def test_a_failing_add_fails_only_that_request_and_the_thread_keeps_serving(engine: Engine) -> None:
    ex = engine.executors["m"]
    ex.hold = True
    bad = engine.submit(request("bad", text="bad add"))
    invalid = engine.submit(request("invalid", text="invalid add"))
    good = engine.submit(request("good"))
    with pytest.raises(ModelError, match="UnicodeEncodeError"):
        bad.result(timeout=5)
    with pytest.raises(InvalidRequest, match="too long"):  # pagedq's own errors are kept as they are
        invalid.result(timeout=5)
    ex.hold = False
    assert good.result(timeout=5) == "done:good"
    assert engine.alive and engine.submit(request("later")).result(timeout=5) == "done:later"
    assert engine.stats()["engine"]["isolated_requests"] == 2


def test_bisection_keeps_deadlines_cancels_and_other_models_going(engine: Engine) -> None:
    ex = engine.executors["m"]
    ex.hold, ex.step_s = True, 0.05
    futures = [engine.submit(request(f"s{i}", text=POISON if i == 6 else "x")) for i in range(8)]
    time.sleep(0.3)
    ex.hold = False
    deadline = time.monotonic() + 5
    while engine.stats()["engine"]["step_errors"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    engine.cancel("s7")  # a suspect
    held = engine.submit(request("held", deadline=time.time() + 0.05))  # arrives while "m" is bisected
    other = engine.submit(request("o", model="other"))
    assert other.result(timeout=5) == "done:o" and not futures[6].done()  # "other" did not wait
    assert isinstance(outcome(futures[7]), TaskCancelled)
    assert isinstance(outcome(held), DeadlineExceeded)
    assert isinstance(outcome(futures[6]), ModelError)
    assert [outcome(f) for f in futures[:6]] == [f"done:s{i}" for i in range(6)]


def test_watchdog_restarts_a_dead_thread_and_in_flight_requests_complete(engine: Engine) -> None:
    ex = engine.executors["m"]
    ex.hold = True
    futures = [engine.submit(request(f"k{i}")) for i in range(4)]
    time.sleep(0.05)
    ex.kill_next, ex.hold = True, False
    wait_until_dead(engine)
    assert not any(f.done() for f in futures)
    assert engine.ensure_alive() and engine.alive
    assert [f.result(timeout=5) for f in futures] == [f"done:k{i}" for i in range(4)]
    stats = engine.stats()["engine"]
    assert stats["restarts"] == 1 and stats["isolated_requests"] == 0 and stats["alive"]


def test_a_request_that_kills_the_thread_every_time_ends_up_failing_alone(engine: Engine) -> None:
    ex = engine.executors["m"]
    ex.hold, ex.kill_on_poison = True, True
    futures = [engine.submit(request(f"p{i}", text=POISON if i == 2 else "x")) for i in range(6)]
    time.sleep(0.05)
    ex.hold = False
    deadline = time.monotonic() + 10
    while not all(f.done() for f in futures):  # the worker's heartbeat calls ensure_alive periodically
        assert time.monotonic() < deadline
        engine.ensure_alive()
        time.sleep(0.01)
    assert isinstance(outcome(futures[2]), ModelError) and "Killer: poisoned batch" in str(outcome(futures[2]))
    assert [outcome(f) for i, f in enumerate(futures) if i != 2] == [f"done:p{i}" for i in (0, 1, 3, 4, 5)]
    assert engine.stats()["engine"]["restarts"] >= 2


def test_stop_without_drain_hands_back_what_is_in_flight() -> None:
    ex = BatchingExecutor("m")
    ex.hold = True
    eng = Engine({"m": ex}).start()
    future = eng.submit(request("s"))
    time.sleep(0.05)
    eng.stop()
    with pytest.raises(WorkerShuttingDown):
        future.result(timeout=5)
    assert not ex.waiting and not eng.alive
    with pytest.raises(WorkerShuttingDown):
        eng.submit(request("late"))
    assert not eng.ensure_alive()  # a stopped engine is not restarted


def test_stop_drains_for_up_to_drain_s() -> None:
    ex = BatchingExecutor("m")
    ex.hold = True
    eng = Engine({"m": ex}).start()
    futures = [eng.submit(request(f"d{i}")) for i in range(3)]
    threading.Timer(0.2, lambda: setattr(ex, "hold", False)).start()
    started = time.monotonic()
    eng.stop(drain_s=5)
    assert [f.result(timeout=0) for f in futures] == ["done:d0", "done:d1", "done:d2"]
    assert time.monotonic() - started < 2 and not eng.alive


class ThreadsSeen(BatchingExecutor):
    """Records the OpenMP thread count its steps run with, in the thread that runs them."""

    def __init__(self, name: str, intra_op_threads: int | None) -> None:
        super().__init__(name)
        self.config = EngineConfig(intra_op_threads=intra_op_threads)
        self.seen: list[int] = []

    def step(self) -> None:
        self.seen.append(torch.get_num_threads())  # omp_get_max_threads() of the engine thread
        super().step()


def test_each_model_steps_with_its_own_intra_op_threads_in_the_engine_thread() -> None:
    before = torch.get_num_threads()  # 1 here (one_torch_thread)
    torch.set_num_threads(3)  # the process default the engine is built with (a worker's main thread)
    try:
        executors = {"one": ThreadsSeen("one", 1), "two": ThreadsSeen("two", 2), "default": ThreadsSeen("d", None)}
        eng = Engine(executors).start()
    finally:
        torch.set_num_threads(before)
    try:
        for round_ in range(2):  # the models alternate: each step gets its model's count, not the last one's
            futures = [eng.submit(request(f"{name}{round_}", model=name)) for name in executors]
            assert [f.result(timeout=5) for f in futures] == [f"done:{n}{round_}" for n in executors]
        # the thread dies in a step of "default" right after one of "one": the restarted thread steps
        # "default" with the engine's default again, not with torch's global count the last step left
        executors["default"].hold = True
        killed = [eng.submit(request(f"k{i}", model="default")) for i in range(2)]
        eng.submit(request("o", model="one")).result(timeout=5)
        executors["default"].kill_next, executors["default"].hold = True, False
        deadline = time.monotonic() + 5
        while not all(f.done() for f in killed):
            assert time.monotonic() < deadline
            eng.ensure_alive()
            time.sleep(0.01)
        assert [f.result(timeout=0) for f in killed] == ["done:k0", "done:k1"]
        assert eng.stats()["engine"]["restarts"] == 1
        seen = {name: set(ex.seen) for name, ex in executors.items()}
        assert seen == {"one": {1}, "two": {2}, "default": {3}}
        assert torch.get_num_threads() == before  # the caller's own count is untouched
        time.sleep(0.1)  # past a stats refresh
        eng.ensure_alive()
        eng.submit(request("s", model="one")).result(timeout=5)
        shown = {name: eng.model_stats()[name].intra_op_threads for name in executors}
        assert shown == {"one": 1, "two": 2, "default": 3}
    finally:
        eng.stop()


class LoadDependent(ThreadsSeen):
    """An "auto" model whose steps compute 300 tokens and are faster on one thread than on more (as the demo
    classifier's on two busy vCPUs)."""

    def __init__(self) -> None:
        super().__init__("auto", "auto")
        self.tokens = 0
        self.full = False  # what `saturated()` reports after a step

    def saturated(self) -> bool:
        return self.full

    def step(self) -> None:
        time.sleep(0.002 if torch.get_num_threads() == 1 else 0.010)  # far apart: a late wake-up cannot swap them
        self.tokens += 300
        super().step()

    def work_done(self) -> int:
        return self.tokens


def test_an_auto_model_steps_with_the_count_its_steps_measured_fastest() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the engine's default: options 1 and 2
    try:
        executor = LoadDependent()
        eng = Engine({"auto": executor}).start()
    finally:
        torch.set_num_threads(before)
    try:
        executor.full = True  # every step at its cap: the estimates choose
        for i in range(60):  # one request per step
            eng.submit(request(f"a{i}", model="auto")).result(timeout=5)
        assert set(executor.seen) == {1, 2}  # both measured
        assert executor.seen[-20:].count(1) >= 20 - 3  # then one thread, but for a re-measuring run
        executor.full = False  # steps below the cap: the estimates too (more threads only where 1.3x faster)
        for i in range(6):
            eng.submit(request(f"b{i}", model="auto")).result(timeout=5)
        assert executor.seen[-5:] == [1] * 5
        executor.full = True
        time.sleep(0.1)  # past a stats refresh
        eng.submit(request("last", model="auto")).result(timeout=5)
        stats = eng.model_stats()["auto"]
        assert stats.intra_op_threads in (1, 2)
        table = stats.intra_op_auto
        assert table is not None and set(table) == {"511"}  # 300 tokens a step: the bucket up to 511 tokens
        assert table["511"]["1"] < table["511"]["2"]  # microseconds per token
    finally:
        eng.stop()


def test_a_registry_entrys_intra_op_threads_override_the_workers() -> None:
    worker = EngineConfig(intra_op_threads=3)
    pinned = ModelSpec(name="a", task=TaskType.CLASSIFY, source="x", intra_op_threads=1)
    unset = ModelSpec(name="b", task=TaskType.CLASSIFY, source="x")
    assert model_config(pinned, worker).intra_op_threads == 1
    assert model_config(unset, worker).intra_op_threads == 3
    assert model_config(unset, EngineConfig()).intra_op_threads is None  # the engine's default then


# ---- real executors over the demo models -----------------------------------------------------------------

BROKEN_TEXT = "ok \ud800 bad"  # a lone surrogate: every tokenizer raises on it (the API will reject it)
TEXTS = ["I love this product.", "Terrible.", "The delivery was late and nobody answered.", "Fine.",
         "Paris is the capital of France.", "Quality is okay for the price"]  # fmt: skip
CONTEXT = "Ada Lovelace wrote the first program for the Analytical Engine in 1843."
QUESTIONS = ["Who wrote the first program?", "When was it written?", "For which engine?", "Who was Ada?"]
TRIGGER = " quokka xylophone"  # a question with these words breaks the LLM's forward (an injected fault)


class GateExecutor(ModelExecutor):
    """Blocks the engine thread inside `step` until `release` is set, so that everything submitted meanwhile
    reaches the other executors' next step together: one batch, as in a busy worker."""

    def __init__(self) -> None:
        super().__init__(LoadedModel(ModelSpec(name="gate", task=TaskType.CLASSIFY, source="none"), None, None,
                                     "cpu", None), EngineConfig())  # fmt: skip
        self.held: list[EngineRequest] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def add(self, request: EngineRequest) -> None:
        self.held.append(request)

    def abort(self, request_id: str, error: BaseException) -> bool:
        return False

    def has_work(self) -> bool:
        return bool(self.held)

    def step(self) -> None:
        self.entered.set()
        self.release.wait(10)
        held, self.held = self.held, []
        for request in held:
            request.finish("gate")


@contextmanager
def one_batch(engine: Engine) -> Iterator[None]:
    """Everything submitted in the block is added before any of it is stepped."""
    gate = engine.executors["gate"]
    assert isinstance(gate, GateExecutor)
    gate.entered.clear()
    gate.release.clear()
    engine.submit(request(f"gate-{time.monotonic_ns()}", model="gate"))
    assert gate.entered.wait(10)
    try:
        yield
    finally:
        gate.release.set()


def run_together(engine: Engine, requests: list[EngineRequest], timeout: float = 120) -> list[Any]:
    with one_batch(engine):
        futures = [engine.submit(r) for r in requests]
    return [outcome(f, timeout) for f in futures]


def assert_same(got: Any, want: Any, path: str = "result") -> None:
    """Equal results; scores (floats) within 1e-5: a different batch may round the last bits differently."""
    if hasattr(want, "model_dump"):
        assert type(got) is type(want), f"{path}: {got!r}"
        got, want = got.model_dump(), want.model_dump()
    if isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            assert_same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


_ids = iter(range(10**9))


def engine_request(model: str, payload: Any) -> EngineRequest:
    task = {ClassifyRequest: TaskType.CLASSIFY, TranslateRequest: TaskType.TRANSLATE, QARequest: TaskType.QA}
    return EngineRequest(id=f"{model}-{next(_ids)}", task=task[type(payload)], payload=payload, model=model)


def translate(text: str, generation: GenerationOptions | None = None) -> EngineRequest:
    """A translation request; `generation` is taken as it is (not validated again)."""
    payload = TranslateRequest(text=text, source_lang="en", target_lang="de")
    if generation is not None:
        payload = payload.model_copy(update={"generation": generation})
    return engine_request("demo-translator", payload)


#: a vanishing temperature, as a message from before the API refused it would carry (validation skipped)
TINY_TEMPERATURE = GenerationOptions.model_construct(do_sample=True, temperature=1e-300)


def generative(question: str, **generation: Any) -> EngineRequest:
    payload = QARequest(question=question, context=CONTEXT, mode="generative",
                        generation=GenerationOptions(**{"max_new_tokens": 16, **generation}))  # fmt: skip
    return engine_request("demo-llm", payload)


@pytest.fixture(scope="module")
def demo_executors(demo_models: Path) -> dict[str, ModelExecutor]:
    registry = Registry.load(demo_models)
    names = ["demo-classifier", "demo-qa", "demo-translator", "demo-llm"]
    return {name: make_executor(load_model(registry.models[name], registry, "cpu"), EngineConfig()) for name in names}


@pytest.fixture()
def demo_engine(demo_executors: dict[str, ModelExecutor]) -> Iterator[Engine]:
    eng = Engine({"gate": GateExecutor(), **demo_executors}).start()
    yield eng
    eng.stop()


def test_every_real_executor_counts_the_tokens_its_steps_compute(demo_executors: dict[str, ModelExecutor]) -> None:
    """What "auto" intra-op threads divide a step's time by (a model without it keeps the default count)."""
    jobs = {"demo-classifier": engine_request("demo-classifier", ClassifyRequest(text=TEXTS[2])),
            "demo-qa": engine_request("demo-qa", QARequest(question=QUESTIONS[0], context=CONTEXT)),
            "demo-translator": translate(TEXTS[4]), "demo-llm": generative(QUESTIONS[1])}
    for name, job in jobs.items():
        executor = demo_executors[name]
        before = executor.work_done()
        executor.add(job)
        steps = 0
        while executor.has_work():
            executor.step()
            steps += 1
        job.future.result(timeout=0)
        assert executor.work_done() - before >= steps, name  # at least a token a step
        assert not executor.saturated(), name


def test_every_real_executor_reports_a_step_at_its_cap_as_saturated(
        demo_executors: dict[str, ModelExecutor]) -> None:
    """When "auto" intra-op threads measure: after a step at the request cap (more requests than one step takes
    here), not after the last steps, which take what is left."""
    for name, make in {"demo-classifier": lambda i: engine_request("demo-classifier", ClassifyRequest(text=TEXTS[i])),
                       "demo-qa": lambda i: engine_request("demo-qa", QARequest(question=QUESTIONS[0],
                                                                                context=CONTEXT)),
                       "demo-translator": lambda i: translate(TEXTS[i]),
                       "demo-llm": lambda i: generative(QUESTIONS[1])}.items():
        executor = demo_executors[name]
        cap = executor.config.max_running_requests
        jobs = [make(i % len(TEXTS)) for i in range(cap + 3)]
        for job in jobs:
            executor.add(job)
        executor.step()
        assert executor.saturated(), name
        while executor.has_work():
            executor.step()
        assert not executor.saturated(), name  # the last step took the rest, below the cap
        assert all(job.future.done() for job in jobs), name


def assert_only_the_poison_fails(engine: Engine, innocents: list[EngineRequest], poisons: list[EngineRequest],
                                 error: str) -> None:  # fmt: skip
    """Run the innocents alone, then again mixed with the poisons in one batch: each poison fails alone with
    ModelError (`error` in its message); every innocent gives what it gave without them."""
    clean = run_together(engine, innocents)
    assert not any(isinstance(r, Exception) for r in clean), clean
    mixed = innocents[: len(innocents) // 2] + poisons + innocents[len(innocents) // 2 :]
    results = dict(zip(mixed, run_together(engine, [_again(r) for r in mixed]), strict=True))
    for poison in poisons:
        assert isinstance(results[poison], ModelError) and error in str(results[poison]), results[poison]
    for innocent, want in zip(innocents, clean, strict=True):
        assert_same(results[innocent], want, innocent.id)
    stats = engine.stats()["engine"]
    assert stats["isolated_requests"] == len(poisons) and stats["alive"]


def _again(r: EngineRequest) -> EngineRequest:
    """The same request under a new id (a fresh future)."""
    return EngineRequest(id=f"{r.id}-again", task=r.task, payload=r.payload, model=r.model)


def test_a_broken_text_fails_alone_in_a_classify_batch(demo_engine: Engine) -> None:
    innocents = [engine_request("demo-classifier", ClassifyRequest(text=t, top_k=None)) for t in TEXTS]
    poison = engine_request("demo-classifier", ClassifyRequest.model_construct(text=BROKEN_TEXT, top_k=None))
    assert_only_the_poison_fails(demo_engine, innocents, [poison], "TypeError")
    assert demo_engine.stats()["engine"]["step_errors"] >= 2  # the tokenizer raised for the whole batch


def test_a_broken_context_fails_alone_in_an_extractive_qa_batch(demo_engine: Engine) -> None:
    innocents = [engine_request("demo-qa", QARequest(question=q, context=CONTEXT)) for q in QUESTIONS]
    poison = engine_request("demo-qa", QARequest.model_construct(question=QUESTIONS[0], context=BROKEN_TEXT))
    assert_only_the_poison_fails(demo_engine, innocents, [poison], "TypeError")


def test_a_broken_text_fails_alone_in_a_translate_batch(demo_engine: Engine) -> None:
    innocents = [translate(t) for t in TEXTS] + [
        translate(TEXTS[0], TINY_TEMPERATURE),  # greedy
        translate(TEXTS[1], GenerationOptions(do_sample=True, temperature=0.8, seed=7)),  # re-run: same tokens
    ]
    poison = engine_request("demo-translator", TranslateRequest.model_construct(
        text=BROKEN_TEXT, source_lang="en", target_lang="de", generation=GenerationOptions()))  # fmt: skip
    assert_only_the_poison_fails(demo_engine, innocents, [poison], "RuntimeError")
    clean = run_together(demo_engine, [translate(TEXTS[0])])[0]
    tiny_temperature = run_together(demo_engine, [translate(TEXTS[0], TINY_TEMPERATURE)])[0]
    assert tiny_temperature == clean


@contextmanager
def forward_fails_on(model: Any, token_ids: list[int]) -> Iterator[None]:
    """`model`'s forward raises while its input ids contain `token_ids` in a row (a fault injected at the
    input embeddings: prompts with the trigger words break the step that prefills them)."""
    trigger = torch.tensor(token_ids)

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        ids = args[0].flatten()
        if ids.numel() >= len(token_ids) and (ids.unfold(0, len(token_ids), 1) == trigger).all(dim=1).any():
            raise RuntimeError("poisoned by the test")

    handle = model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_poisons_fail_alone_in_a_generative_batch(demo_engine: Engine) -> None:
    executor = demo_engine.executors["demo-llm"]
    tokenizer, model = executor.loaded.tokenizer, executor.loaded.model
    innocents = [generative(q) for q in QUESTIONS] + [generative(QUESTIONS[0], do_sample=True, temperature=0.9, seed=3)]
    broken = engine_request("demo-llm", QARequest.model_construct(
        question="Who?", context=BROKEN_TEXT, mode="generative", generation=GenerationOptions()))  # fmt: skip
    faulty = generative(f"Who is the{TRIGGER}?")
    with forward_fails_on(model, tokenizer.encode(TRIGGER, add_special_tokens=False)):
        assert_only_the_poison_fails(demo_engine, innocents, [broken], "TypeError")  # `add` tokenizes
        before = demo_engine.stats()["engine"]["isolated_requests"]
        mixed = innocents[:3] + [faulty] + innocents[3:]
        results = run_together(demo_engine, [_again(r) for r in mixed])
        clean = run_together(demo_engine, [_again(r) for r in innocents])
    assert isinstance(results[3], ModelError) and str(results[3]) == "RuntimeError: poisoned by the test"
    for got, want in zip(results[:3] + results[4:], clean, strict=True):
        assert_same(got, want)
    stats = demo_engine.stats()["engine"]
    assert stats["isolated_requests"] == before + 1 and stats["step_errors"] >= 2


def test_watchdog_restarts_the_thread_and_real_requests_complete(
    demo_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    innocents = [engine_request("demo-classifier", ClassifyRequest(text=t, top_k=None)) for t in TEXTS]
    innocents += [generative(q) for q in QUESTIONS]
    clean = run_together(demo_engine, innocents)
    executor = demo_engine.executors["demo-llm"]
    real_step = executor.step

    def step_once_then_die() -> None:
        real_step()
        monkeypatch.setattr(executor, "step", real_step)
        raise Killer("thread killed in a test")

    monkeypatch.setattr(executor, "step", step_once_then_die)
    with one_batch(demo_engine):
        futures = [demo_engine.submit(_again(r)) for r in innocents]
    deadline = time.monotonic() + 30
    while demo_engine.alive:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert demo_engine.ensure_alive()
    for future, want in zip(futures, clean, strict=True):
        assert_same(outcome(future, 120), want)
    assert demo_engine.stats()["engine"]["restarts"] == 1


def test_stop_lets_in_flight_generation_finish_within_the_drain(demo_engine: Engine) -> None:
    innocents = [generative(q, max_new_tokens=48) for q in QUESTIONS]
    clean = run_together(demo_engine, innocents)
    with one_batch(demo_engine):
        futures = [demo_engine.submit(_again(r)) for r in innocents]
    demo_engine.stop(drain_s=60)
    for future, want in zip(futures, clean, strict=True):
        assert_same(future.result(timeout=0), want)
    with pytest.raises(WorkerShuttingDown):
        demo_engine.submit(generative(QUESTIONS[0]))


def test_stop_hands_back_what_the_drain_did_not_finish(demo_engine: Engine) -> None:
    stats = demo_engine.executors["demo-llm"].stats
    generated = stats().generated_tokens
    futures = [demo_engine.submit(generative(q, max_new_tokens=500)) for q in QUESTIONS]
    deadline = time.monotonic() + 30
    while stats().generated_tokens < generated + 8:  # generation is under way
        assert time.monotonic() < deadline
        time.sleep(0.005)
    demo_engine.stop(drain_s=0.05)
    errors = [outcome(f, timeout=0) for f in futures]
    assert all(isinstance(e, WorkerShuttingDown) and not isinstance(e, EngineError) for e in errors), errors
    assert stats().num_requests_running == 0 and stats().num_requests_waiting == 0


def test_every_executor_kind_reports_its_stats_in_one_shape(demo_executors: dict[str, ModelExecutor]) -> None:
    """Classification, extractive QA, translation and the paged causal LM fill the same `ModelStats` fields
    the metrics collector, Flower and the benchmarks read (no key of one kind spelled differently)."""
    engine = Engine(demo_executors).start()
    try:
        jobs = [engine_request("demo-classifier", ClassifyRequest(text="a fine day")),
                engine_request("demo-qa", QARequest(question="who?", context="Ada wrote the first program.")),
                translate("Good morning."), generative(QUESTIONS[0], max_new_tokens=4)]
        for job in jobs:
            engine.submit(job).result(timeout=120)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(s.num_requests_finished for s in engine.model_stats().values()) < 4:
            time.sleep(0.02)
        stats = engine.model_stats()
        for job in jobs:
            got = stats[job.model]
            assert isinstance(got, ModelStats), job.model
            assert got.num_requests_finished >= 1 and got.steps >= 1, (job.model, got)
            assert got.path in ("packed", "padded", "paged", "generate"), (job.model, got)
        assert stats["demo-translator"].generated_tokens > 0 and stats["demo-llm"].generated_tokens > 0
        flat = engine.stats()["models"]["demo-llm"]  # what `celery inspect stats` and Flower get
        assert flat["steps"] == stats["demo-llm"].steps and "mean_batch_tokens" in flat
    finally:
        engine.stop()
