"""The engine-core process (worker/engine/process.py): real demo models loaded in a spawned process, requests
and results across its pipe, a core killed and started again, a drained stop, signals, its worker's death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest

from pagedq.shared.errors import ModelNotFound, WorkerShuttingDown
from pagedq.shared.models import ClassifyRequest, GenerationOptions, QARequest, TaskType, TranslateRequest
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Settings
from pagedq.worker.engine.core.executor import EngineRequest
from pagedq.worker.engine.lanes import EngineLanes
from pagedq.worker.engine.process import EngineProcess
from pagedq.worker.runtime import engine_config, load_executors

TEXTS = ["a fine day", "the worst service I ever had", "ok", "nothing to say about it at all, really", "great"]


def _settings(demo_models: Path, **extra: Any) -> Settings:
    return Settings(registry_path=demo_models, device="cpu", metrics_port=0, engine_process=True, **extra)


@pytest.fixture()
def core(demo_models: Path) -> Iterator[EngineProcess]:
    engine = EngineProcess(_settings(demo_models), Registry.load(demo_models)).start()
    yield engine
    engine.stop()


def classify(i: int, text: str) -> EngineRequest:
    return EngineRequest(id=f"c{i}", task=TaskType.CLASSIFY, payload=ClassifyRequest(text=text),
                         model="demo-classifier")


def translate(i: int, tokens: int) -> EngineRequest:
    payload = TranslateRequest(text=f"sentence number {i}", generation=GenerationOptions(max_new_tokens=tokens))
    return EngineRequest(id=f"t{i}", task=TaskType.TRANSLATE, payload=payload, model="demo-translator")


def generate(i: int, tokens: int) -> EngineRequest:
    payload = QARequest(question=f"question {i}?", context="Ada wrote it.", mode="generative",
                        generation=GenerationOptions(max_new_tokens=tokens))
    return EngineRequest(id=f"g{i}", task=TaskType.QA, payload=payload, model="demo-llm")


def test_the_core_answers_as_the_engine_in_this_process_does(core: EngineProcess, demo_models: Path) -> None:
    """Classification and translation through the core equal the same engine run here (scores within 1e-5:
    another intra-op thread count sums in another order; translations token for token). The core's futures
    complete with the results' JSON form, which is what a task stores."""
    requests = [classify(i, t) for i, t in enumerate(TEXTS)] + [translate(i, 12) for i in range(3)]
    core.submit_many(requests)
    remote = [r.future.result(timeout=60) for r in requests]

    registry = Registry.load(demo_models)
    executors, _ = load_executors(registry, "cpu", engine_config(_settings(demo_models)))
    lanes = EngineLanes({name: executors[name] for name in ("demo-classifier", "demo-translator")}).start()
    try:
        local = [classify(i, t) for i, t in enumerate(TEXTS)] + [translate(i, 12) for i in range(3)]
        lanes.submit_many(local)
        here = [r.future.result(timeout=60).model_dump(mode="json") for r in local]
    finally:
        lanes.stop()
    assert all(type(r) is dict for r in remote)
    for got, want in zip(remote[: len(TEXTS)], here[: len(TEXTS)], strict=True):
        assert got["label"] == want["label"]
        assert [x["score"] for x in got["scores"]] == pytest.approx([x["score"] for x in want["scores"]], abs=1e-5)
        assert {k: v for k, v in got.items() if k != "scores"} == pytest.approx(
            {k: v for k, v in want.items() if k != "scores"}, abs=1e-5)
    for got, want in zip(remote[len(TEXTS):], here[len(TEXTS):], strict=True):
        assert got == want
    assert all(r.finished_at is not None and r.finished_at >= r.arrival for r in requests)

    stats = core.stats()
    assert stats["engine"]["process"] is True and stats["engine"]["alive"] is True
    assert stats["engine"]["requests_finished"] == len(requests)
    assert core.model_stats()["demo-classifier"].num_requests_finished == len(TEXTS)
    assert core.threads()["demo-translator"] == (True, 0)


def test_a_request_for_a_model_the_core_does_not_serve_fails_alone(core: EngineProcess) -> None:
    good, bad = classify(0, "fine"), EngineRequest(id="x", task=TaskType.CLASSIFY,
                                                   payload=ClassifyRequest(text="hi"), model="no-such-model")
    core.submit_many([good, bad])
    assert good.future.result(timeout=60)["label"]
    with pytest.raises(ModelNotFound, match="no-such-model"):
        bad.future.result(timeout=1)


def test_generated_tokens_reach_the_front_end_in_order_before_the_result(core: EngineProcess) -> None:
    """A streaming request: the core's executor opens the stream and its tokens cross the pipe to the sink
    here, opened with the front end's tokenizer of the model, every token before the result."""
    seen: list[Any] = []

    class Sink:
        def open(self, tokenizer: Any, stop: Any = ()) -> Any:
            seen.append(("open", type(tokenizer).__name__))
            return lambda attempt, token: seen.append(("token", request.future.done()))

    payload = QARequest(question="who?", context="Ada wrote it.", mode="generative",
                        generation=GenerationOptions(max_new_tokens=16, stream=True))
    request = EngineRequest(id="g", task=TaskType.QA, payload=payload, model="demo-llm", stream=Sink())
    core.submit_many([request])
    result = request.future.result(timeout=60)
    assert seen[0][0] == "open" and "Tokenizer" in seen[0][1]
    tokens = [done for kind, done in seen if kind == "token"]
    assert len(tokens) == result["output_tokens"] and not any(tokens)  # all before the future completed


def test_a_core_that_dies_hands_its_requests_back_and_is_started_again(core: EngineProcess) -> None:
    first_pid = core.stats()["engine"]["pid"]
    requests = [generate(i, 512) for i in range(8)]  # long enough to be in flight when the core dies
    core.submit_many(requests)
    time.sleep(0.2)
    os.kill(first_pid, signal.SIGKILL)
    done, _ = wait([r.future for r in requests], timeout=30)
    assert len(done) == len(requests)
    errors = [r.future.exception() for r in requests]
    assert all(e is None or isinstance(e, WorkerShuttingDown) for e in errors)  # finished, or back to the queue
    assert any(isinstance(e, WorkerShuttingDown) for e in errors)
    assert not core.alive
    assert core.ensure_alive() and core.alive and core.restarts == 1
    assert core.stats()["engine"]["pid"] != first_pid
    again = classify(0, "after the restart")
    core.submit_many([again])
    assert again.future.result(timeout=60)["label"]


def test_stop_drains_what_is_in_flight_then_refuses(demo_models: Path) -> None:
    engine = EngineProcess(_settings(demo_models), Registry.load(demo_models)).start()
    pid = engine.stats()["engine"]["pid"]
    requests = [translate(i, 24) for i in range(6)]
    engine.submit_many(requests)
    engine.stop(drain_s=60)
    assert all(r.future.result(timeout=0)["output_tokens"] > 0 for r in requests)  # drained, not handed back
    with pytest.raises(WorkerShuttingDown):
        engine.submit_many([classify(0, "too late")])
    assert not _exists(pid)


def test_stop_with_no_drain_hands_long_requests_back(demo_models: Path) -> None:
    engine = EngineProcess(_settings(demo_models), Registry.load(demo_models)).start()
    requests = [generate(i, 512) for i in range(4)]
    engine.submit_many(requests)
    time.sleep(0.3)
    engine.stop(drain_s=0)
    errors = [r.future.exception(timeout=0) for r in requests]
    assert all(e is None or isinstance(e, WorkerShuttingDown) for e in errors)
    assert any(isinstance(e, WorkerShuttingDown) for e in errors)


def test_the_core_ignores_sigterm_and_ends_with_its_worker(demo_models: Path, tmp_path: Path) -> None:
    """The worker's process group gets SIGTERM on a warm shutdown: the core keeps running (the worker stops
    it after the drain). When the worker process is killed, the core sees its pipe end and exits."""
    script = tmp_path / "front.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pagedq.shared.registry import Registry
        from pagedq.shared.settings import Settings
        from pagedq.worker.engine.process import EngineProcess
        if __name__ == "__main__":  # the core is started with spawn, which imports this module again
            path = Path({str(demo_models)!r})
            engine = EngineProcess(Settings(registry_path=path, device="cpu", metrics_port=0, engine_process=True),
                                   Registry.load(path)).start()
            print(engine.stats()["engine"]["pid"], flush=True)
            time.sleep(600)
    """))
    front = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert front.stdout is not None
        pid = int(front.stdout.readline())
        os.kill(pid, signal.SIGTERM)
        time.sleep(1.0)
        assert _exists(pid), "the core died of SIGTERM"
        front.kill()
        front.wait(10)
        deadline = time.monotonic() + 15
        while _exists(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _exists(pid), "the core outlived its worker"
    finally:
        front.kill()


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_a_result_that_cannot_cross_the_pipe_fails_its_request_alone() -> None:
    """The core's sender dumps each result to JSON (`_wire`, off the engine thread); a result that cannot be
    dumped becomes that request's failure, and the sender goes on with the next event."""
    from pagedq.shared.errors import EngineError
    from pagedq.shared.models import ClassifyResult
    from pagedq.worker.engine.process import _wire

    class Broken:
        def model_dump(self, mode: str = "python") -> Any:
            raise ValueError("not serializable")

    good = ClassifyResult(model="m", label="a", score=1.0, scores=[])
    assert _wire(("done", 1, good, None, 2.5)) == ("done", 1, good.model_dump(mode="json"), None, 2.5)
    kind, key, error = _wire(("done", 2, Broken(), None, None))
    assert (kind, key) == ("fail", 2) and isinstance(error, EngineError) and "not serializable" in str(error)
    assert _wire(("token", 3, "a", 7)) == ("token", 3, "a", 7)  # other events pass as they are
