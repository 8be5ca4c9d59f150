"""The worker's engine loop (worker/engine/service.py): batching hand-off, deadlines, cancellation and
failure isolation. The executor here is a minimal in-test one so the loop's own guarantees are tested
exactly; real executors over real models are tested in test_executors.py and the integration tests."""

from __future__ import annotations

import time
from typing import Any

import pytest

from shared.errors import DeadlineExceeded, EngineError, ModelNotFound, TaskCancelled
from shared.models import ClassifyRequest, TaskType
from shared.registry import ModelSpec
from worker.engine.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor
from worker.engine.service import Engine


class BatchingExecutor(ModelExecutor):
    """Completes every waiting request in one step (a batch), unless it is told to hold or to fail."""

    def __init__(self, name: str) -> None:
        spec = ModelSpec(name=name, task=TaskType.CLASSIFY, source="none")
        super().__init__(LoadedModel(spec, None, None, "cpu", None), EngineConfig())
        self.waiting: dict[str, EngineRequest] = {}
        self.batches: list[list[str]] = []
        self.hold = False
        self.fail_next = False

    def add(self, request: EngineRequest) -> None:
        self.waiting[request.id] = request

    def abort(self, request_id: str, error: BaseException) -> bool:
        request = self.waiting.pop(request_id, None)
        return request is not None and request.fail(error)

    def has_work(self) -> bool:
        return bool(self.waiting)

    def step(self) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        if self.hold:
            time.sleep(0.01)
            return
        batch, self.waiting = self.waiting, {}
        self.batches.append(list(batch))
        for request in batch.values():
            request.finish(f"done:{request.id}")

    def stats(self) -> dict[str, float]:
        return {"num_requests_waiting": len(self.waiting)}


def request(rid: str, model: str = "m", deadline: float | None = None) -> EngineRequest:
    return EngineRequest(id=rid, task=TaskType.CLASSIFY, payload=ClassifyRequest(text="x"), model=model,
                         deadline=deadline)


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


def test_deadline_expires_a_waiting_request(engine: Engine) -> None:
    engine.executors["m"].hold = True
    future = engine.submit(request("late", deadline=time.time() + 0.2))
    with pytest.raises(DeadlineExceeded):
        future.result(timeout=5)
    assert "late" not in engine.executors["m"].waiting


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
    with pytest.raises(EngineError, match="RuntimeError: boom"):
        doomed.result(timeout=5)
    assert fine.result(timeout=5) == "done:f1"
    assert engine.alive
    assert engine.submit(request("after")).result(timeout=5) == "done:after"
    assert engine.stats()["engine"]["step_errors"] == 1


def test_stop_fails_what_is_still_in_flight() -> None:
    ex = BatchingExecutor("m")
    ex.hold = True
    eng = Engine({"m": ex}).start()
    future = eng.submit(request("s"))
    time.sleep(0.05)
    eng.stop()
    with pytest.raises(EngineError, match="shutting down"):
        future.result(timeout=5)
