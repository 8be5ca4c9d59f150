"""One model that cannot be served never stops a worker: it is left out, the worker serves the others.

`WorkerRuntime.start` (what the worker's EngineStep runs) on a registry of a good tiny BERT classifier, a
corrupt model directory (config.json is not JSON: refused, one ERROR line without a traceback) and a model
whose executor build hits a bug (an AttributeError: one ERROR line with the traceback). Against the session's
private redis-server; no worker process is needed to see what Flower, the lease and a task would see.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
from transformers.utils import logging as hf_logging

import pagedq.worker.runtime as runtime_module
from pagedq.producer.service import TaskService
from pagedq.shared.celery_config import make_celery
from pagedq.shared.models import ClassifyRequest, TaskType
from pagedq.shared.records import LEASE_PREFIX
from pagedq.shared.settings import Settings
from pagedq.worker.demo.tokenizers import build_wordpiece
from pagedq.worker.engine.core.executor import EngineRequest
from pagedq.worker.runtime import WorkerRuntime
from pagedq.worker.tasks import Item, run_items

REGISTRY = """
[defaults]
classify = "good"

[models.good]
task = "classify"
source = "./good"

[models.corrupt]
task = "classify"
source = "./corrupt"

[models.buggy]
task = "classify"
source = "./good"
"""


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refused-models")
    tokenizer = build_wordpiece(BertTokenizerFast, root / "good")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BertForSequenceClassification(config).save_pretrained(root / "good")
    if bars:
        hf_logging.enable_progress_bar()
    (root / "corrupt").mkdir()
    shutil.copy(root / "good" / "tokenizer.json", root / "corrupt")
    (root / "corrupt" / "config.json").write_text("{not json")
    (root / "registry.toml").write_text(REGISTRY)
    return root


@pytest.fixture()
def runtime(model_root: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch,
            caplog: pytest.LogCaptureFixture) -> Iterator[WorkerRuntime]:
    real = runtime_module.make_executor

    def make_executor(loaded: Any, config: Any) -> Any:
        if loaded.spec.name == "buggy":
            raise AttributeError("'BertConfig' object has no attribute 'decoder_attention_heads'")
        return real(loaded, config)

    monkeypatch.setattr(runtime_module, "make_executor", make_executor)
    # the engine in this process (the patched make_executor and the log capture reach no other process; the
    # engine-core process's refusals: test_the_engine_process_refuses_what_it_cannot_load)
    settings = Settings(redis_url=redis_url, registry_path=model_root / "registry.toml", device="cpu",
                        metrics_port=0, engine_process=False)
    with caplog.at_level(logging.ERROR, logger="pagedq.worker.runtime"):
        rt = WorkerRuntime.start(settings)
    rt.start_lease(make_celery(main="pagedq-test-worker"), "test-host", lambda: ())
    yield rt
    rt.stop()


def test_the_worker_serves_the_good_model_and_says_why_the_others_are_refused(
    runtime: WorkerRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    assert sorted(runtime.refused) == ["buggy", "corrupt"]
    assert runtime.refused["corrupt"].startswith("OSError: ") and "not a valid JSON file" in runtime.refused["corrupt"]
    assert runtime.refused["buggy"].startswith("AttributeError: ")

    records = {r.getMessage().split()[1]: r for r in caplog.get_records("setup") if r.name == "pagedq.worker.runtime"}
    assert sorted(records) == ["buggy", "corrupt"]  # one line per refused model
    assert all(r.levelname == "ERROR" for r in records.values())
    assert records["corrupt"].exc_info is None  # expected refusal: the reason, no traceback
    assert records["buggy"].exc_info is not None  # a bug: with its traceback

    # what Flower's worker info / `celery inspect stats` show (EngineStep.info)
    from pagedq.worker.app import EngineStep

    deadline = time.monotonic() + 5
    while len(runtime.engine.stats()["models"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # the engine thread refreshes its stats snapshot every STATS_INTERVAL_S

    shown = EngineStep.info(None, SimpleNamespace(app=SimpleNamespace(pagedq_runtime=runtime)))
    info = shown["pagedq"]
    # Flower's "Other" tab: a readable line for the engine and each model, beside the raw dict
    assert shown["pagedq engine"].startswith("running (3 engine threads); ")  # one per model, refused ones too
    assert shown["pagedq model corrupt"].startswith("refused: OSError: ")
    assert shown["pagedq model good"].startswith("loaded: ") and "path packed" in shown["pagedq model good"]
    assert "0 running, 0 waiting" in shown["pagedq model good"]
    assert info["ready"] is True
    states = info["model_states"]
    assert states["good"] == f"loaded: {(runtime.registry.base_dir or Path()) / 'good'}"
    assert states["corrupt"].startswith("refused: OSError: ") and states["buggy"].startswith("refused: Attribute")
    assert info["models"]["corrupt"]["path"] == "refused"
    assert info["models"]["corrupt"]["path_reason"] == runtime.refused["corrupt"]
    assert info["models"]["good"]["path"] == "packed"

    # the lease every live worker writes
    lease = json.loads(runtime.records.redis.get(LEASE_PREFIX + runtime.worker_id))
    assert lease["ready"] is True and lease["refused"] == runtime.refused


def test_a_request_for_the_good_model_is_served(runtime: WorkerRuntime) -> None:
    request = EngineRequest(id="r-good", task=TaskType.CLASSIFY, payload=ClassifyRequest(text="a fine day"),
                            model="good")
    result = runtime.engine.submit(request).result(timeout=30)
    assert result.model == "good" and result.label in ("negative", "positive")


def test_a_task_for_a_refused_model_fails_with_the_reason(runtime: WorkerRuntime) -> None:
    """Through the Celery task body (claim, submit, finalize): failed, ModelNotFound, the reason in the message."""
    task_id = uuid.uuid4().hex
    runtime.records.create(task_id, TaskType.CLASSIFY, "corrupt", 0, None)
    message = {"request": {"text": "hello", "model": "corrupt"}, "model": "corrupt"}
    task = SimpleNamespace(request=SimpleNamespace(delivery_info={"delivery_tag": "1"}))
    [item] = run_items(task, runtime, TaskType.CLASSIFY, [Item(task_id, message)])  # type: ignore[arg-type]
    assert type(item.error).__name__ == "ModelNotFound"
    record = runtime.records.get(task_id) or {}
    assert record["state"] == "failed", record
    error = json.loads(record["error"])
    assert error["type"] == "ModelNotFound"
    assert "refused when the worker loaded it" in error["message"] and "not a valid JSON file" in error["message"]


def test_two_deliveries_of_one_task_at_once_run_it_once(runtime: WorkerRuntime,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A message the reconciler restored and one it re-sent can reach one worker together (one consumer read):
    the claims answer `run` and `mine`; one delivery runs the task, the other does not, and the task succeeds
    (before `WorkerRuntime.take`, both ran and the engine's duplicate-id refusal failed the task: bench/faults.py
    kills-in-a-row, "request ... already exists")."""
    task_id = uuid.uuid4().hex
    runtime.records.create(task_id, TaskType.CLASSIFY, "good", 0, None)
    real = runtime.records.claim_many
    both_claimed = threading.Barrier(2)

    def claim_many(*args: Any, **kwargs: Any) -> Any:
        answer = real(*args, **kwargs)
        both_claimed.wait(10)  # both deliveries hold their claim's answer before either goes on
        return answer

    monkeypatch.setattr(runtime.records, "claim_many", claim_many)
    items: list[Item] = []

    def deliver(tag: str) -> None:
        task = SimpleNamespace(request=SimpleNamespace(delivery_info={"delivery_tag": tag}))
        items.extend(run_items(task, runtime, TaskType.CLASSIFY,  # type: ignore[arg-type]
                               [Item(task_id, {"request": {"text": "a fine day"}, "model": "good"})]))

    threads = [threading.Thread(target=deliver, args=(tag,)) for tag in ("1", "2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    record = runtime.records.get(task_id) or {}
    assert record.get("state") == "succeeded", record
    assert [i.error for i in items] == [None, None]
    assert sorted(i.request is not None for i in items) == [False, True]  # one delivery ran it
    assert task_id not in runtime.inflight


def test_a_finished_task_is_freed_without_the_garbage_collector(runtime: WorkerRuntime) -> None:
    """Through the task body: once the task is final, its item, request and future hold no reference cycle, so
    reference counting frees them (a cycle per item left ~55,000 objects per 2,000-text bulk to the collector's
    full passes, 30-50 ms each with every worker thread stopped)."""
    task_id = uuid.uuid4().hex
    runtime.records.create(task_id, TaskType.CLASSIFY, "good", 0, None)
    task = SimpleNamespace(request=SimpleNamespace(delivery_info={"delivery_tag": "1"}))
    gc.collect()
    gc.disable()
    try:
        [item] = run_items(task, runtime, TaskType.CLASSIFY,  # type: ignore[arg-type]
                           [Item(task_id, {"request": {"text": "a fine day"}, "model": "good"})])
        assert item.error is None and (runtime.records.get(task_id) or {})["state"] == "succeeded"
        assert item.request is not None
        future, request = weakref.ref(item.request.future), weakref.ref(item.request)
        del item
        deadline = time.monotonic() + 5
        while (future() is not None or request() is not None) and time.monotonic() < deadline:
            time.sleep(0.02)  # the engine thread lets go of its flight at its next iteration
        assert future() is None and request() is None
    finally:
        gc.enable()


def test_a_task_arriving_while_the_engine_stops_is_handed_back_at_once(runtime: WorkerRuntime) -> None:
    """The engine refuses new requests once it stops (WorkerShuttingDown): the task body releases the claim and
    rejects the message for requeue right away -- it does not wait for a future the engine never took."""
    from celery.exceptions import Reject

    task_id = uuid.uuid4().hex
    runtime.records.create(task_id, TaskType.CLASSIFY, "good", 0, None)
    runtime.engine.stop()
    task = SimpleNamespace(request=SimpleNamespace(delivery_info={"delivery_tag": "1"}))
    raised: list[BaseException] = []

    def body() -> None:
        try:
            run_items(task, runtime, TaskType.CLASSIFY, [Item(task_id, {"request": {"text": "hi"}, "model": "good"})])  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - checked below
            raised.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the task body waited for a request the engine never took"
    assert len(raised) == 1 and isinstance(raised[0], Reject) and raised[0].requeue
    record = runtime.records.get(task_id) or {}
    assert "state" not in record and not record.get("worker"), record  # released: not final, owned by nobody


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "engine-thread"])
def test_a_worker_with_no_loadable_model_refuses_to_start(model_root: Path, redis_url: str, tmp_path: Path,
                                                          engine_process: bool) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(f'[models.corrupt]\ntask = "classify"\nsource = "{model_root / "corrupt"}"\n')
    settings = Settings(redis_url=redis_url, registry_path=registry, device="cpu", metrics_port=0,
                        engine_process=engine_process)
    with pytest.raises(RuntimeError, match="no model of the registry could be loaded.*corrupt: OSError"):
        WorkerRuntime.start(settings)


def test_a_producer_without_a_registry_file_validates_against_what_the_workers_serve(
    runtime: WorkerRuntime, redis_url: str
) -> None:
    """The worker publishes what it serves in its lease; a producer with no registry file checks requests
    against it: a refused model is rejected at submission with the worker's reason, an unknown one too, and
    nothing of either is recorded or enqueued."""
    from pagedq.shared.errors import ModelNotFound
    from pagedq.shared.records import OPEN_KEY

    published = json.loads(runtime.records.redis.get(LEASE_PREFIX + runtime.worker_id))["registry"]
    assert set(published["models"]) == {"good"} and set(published["refused"]) == {"buggy", "corrupt"}
    service = TaskService(Settings(redis_url=redis_url, registry_path=None))
    try:
        open_before = runtime.records.redis.zcard(OPEN_KEY)
        with pytest.raises(ModelNotFound, match="'corrupt' is not served: the workers refused it .*valid JSON"):
            service.submit(TaskType.CLASSIFY, {"text": "hello", "model": "corrupt"})
        with pytest.raises(ModelNotFound, match="unknown model 'nope'; known: \\['good'\\]"):
            service.submit(TaskType.CLASSIFY, {"text": "hello", "model": "nope"})
        with pytest.raises(ModelNotFound, match="'good' serves classify, not translate"):
            service.submit(TaskType.TRANSLATE, {"text": "hello", "model": "good"})
        assert runtime.records.redis.zcard(OPEN_KEY) == open_before  # nothing recorded
        accepted = service.submit(TaskType.CLASSIFY, {"text": "hello"})  # no model named: the served one
        assert runtime.records.get(accepted.id)["model"] == "good"  # type: ignore[index]
    finally:
        service.close()


def test_engine_threads_shared_runs_every_model_in_one_engine_thread(model_root: Path, redis_url: str) -> None:
    """`PAGEDQ_ENGINE_THREADS=shared`: the worker's models (refused stand-ins included) step in one thread."""
    from pagedq.shared.models import ClassifyRequest, TaskType
    from pagedq.worker.engine.core.executor import EngineRequest

    settings = Settings(redis_url=redis_url, registry_path=model_root / "registry.toml", device="cpu",
                        metrics_port=0, engine_threads="shared", engine_process=False)
    rt = WorkerRuntime.start(settings)
    try:
        assert len(rt.engine.lanes) == 1 and rt.engine.stats()["engine"]["lanes"] == 1
        assert sorted(rt.engine.lanes[0].executors) == ["buggy", "corrupt", "good"]
        request = EngineRequest(id="s1", task=TaskType.CLASSIFY, payload=ClassifyRequest(text="fine"), model="good")
        assert rt.engine.submit(request).result(timeout=30).label
        assert rt.engine.lanes[0]._thread.name == "pagedq-engine"
    finally:
        rt.stop()


def test_the_engine_process_refuses_what_it_cannot_load(model_root: Path, redis_url: str) -> None:
    """The default worker (models in its engine-core process): a model that cannot load is refused with the
    reason, published in the lease for producers, and a task for it fails with that reason; the good model
    serves."""
    from pagedq.shared.models import ClassifyRequest, TaskType
    from pagedq.worker.engine.core.executor import EngineRequest

    settings = Settings(redis_url=redis_url, registry_path=model_root / "registry.toml", device="cpu",
                        metrics_port=0)
    assert settings.engine_process
    rt = WorkerRuntime.start(settings)
    try:
        refused = rt.engine.refused
        assert set(refused) == {"corrupt"} and "OSError" in refused["corrupt"], refused
        request = EngineRequest(id="p1", task=TaskType.CLASSIFY, payload=ClassifyRequest(text="fine"), model="good")
        assert rt.engine.submit(request).result(timeout=60)["label"] in {"negative", "positive"}
        rt.start_lease(make_celery(main="pagedq-test-worker"), "test-host", lambda: ())
        published = json.loads(rt.records.redis.get(LEASE_PREFIX + rt.worker_id))["registry"]  # type: ignore[arg-type]
        assert set(published["models"]) == {"good", "buggy"} and set(published["refused"]) == {"corrupt"}
    finally:
        rt.stop()
