"""The producer core against a real (private) Redis: what a submission writes, how statuses map, cancel.

No worker runs here: a worker's outcomes are simulated through the task records' own transitions
(`claim`, `finalize`, `release`), exactly the calls a worker makes.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from pagedq.producer import submission
from pagedq.producer.client import Client, TaskFailed
from pagedq.producer.errors import TaskAlreadyFinished
from pagedq.producer.service import TaskService
from pagedq.shared.celery_config import PRIORITY_SEP as SEP
from pagedq.shared.celery_config import redis_queue_keys
from pagedq.shared.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    ModelNotFound,
    TaskCancelled,
    TaskNotFound,
    UnsupportedLanguagePair,
)
from pagedq.shared.models import ClassifyRequest, ClassifyResult, TaskState, TaskType, TranslateRequest
from pagedq.shared.records import KEY_PREFIX, Claim, Outcome
from pagedq.shared.redis_server import free_port
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Limits, Settings

REGISTRY_TOML = """
[defaults]
classify = "sentiment"
translate = "en-de"

[models.sentiment]
task = "classify"
source = "./models/sentiment"

[models.topics]
task = "classify"
source = "./models/topics"

[models.en-de]
task = "translate"
source = "./models/en-de"
languages = ["en-de"]

[models.squad]
task = "qa"
source = "./models/squad"
"""

#: kombu's Redis transport: priority 0..9 -> steps [0, 3, 6, 9]; step 0 is the bare queue, else "queue:step".
PRIORITY_KEYS = ["", SEP + "3", SEP + "6", SEP + "9"]
SUCCESS = {
    "type": "classify",
    "model": "sentiment",
    "label": "POSITIVE",
    "score": 0.9,
    "scores": [{"label": "POSITIVE", "score": 0.9}],
}
#: where workers' leases live (worker/lease.py); claims check an owner's liveness there
LEASES = "pagedq:lease:"


def queued(r: redis.Redis, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """(Redis list, message) for every message waiting on `queue` in any priority sub-queue."""
    found = []
    for suffix in PRIORITY_KEYS:
        for raw in r.lrange(queue + suffix, 0, -1):
            found.append((queue + suffix, json.loads(raw)))
    return found


def body_of(message: dict[str, Any]) -> Any:
    """The task arguments: Celery's protocol-2 body is base64 JSON `[args, kwargs, embed]`."""
    return json.loads(base64.b64decode(message["body"]))


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture()
def settings(redis_url: str) -> Settings:
    return Settings(
        redis_url=redis_url, registry_path=None, default_timeout_s=600.0, limits=Limits(max_text_chars=100, max_bulk=5),
        bulk_message_items=2,
    )


@pytest.fixture()
def service(settings: Settings) -> TaskService:
    return TaskService(settings)


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY_TOML)
    return Registry.load(path)


@pytest.fixture()
def registered(settings: Settings, registry: Registry) -> TaskService:
    return TaskService(settings, registry)


# -- submission -----------------------------------------------------------------------------------------


def test_submit_writes_a_record_and_one_message_with_the_contract_body(service: TaskService, r: redis.Redis) -> None:
    before = time.time()
    submitted = service.submit(TaskType.CLASSIFY, {"text": "I loved it", "top_k": 2})

    assert submitted.type is TaskType.CLASSIFY and submitted.state is TaskState.QUEUED
    assert submitted.location == f"/v1/tasks/{submitted.id}"
    record = r.hgetall(KEY_PREFIX + submitted.id)
    assert record["type"] == "classify" and record["model"] == "default" and record["priority"] == "0"
    assert 0 < r.ttl(KEY_PREFIX + submitted.id) <= service.settings.result_ttl_s

    [(key, message)] = queued(r, "pagedq.classify")
    assert key == "pagedq.classify" + SEP + "3"  # pagedq priority 0 -> celery 4 -> step 3
    assert message["headers"]["task"] == "pagedq.classify" and message["headers"]["id"] == submitted.id
    assert message["properties"]["priority"] == 4
    args, kwargs, _ = body_of(message)
    assert kwargs == {}
    [sent] = args
    assert set(sent) == {"request", "model", "deadline", "submitted_at"}
    assert sent["request"] == {"text": "I loved it", "top_k": 2}  # the fields at their defaults are left out
    assert ClassifyRequest.model_validate(sent["request"]) == ClassifyRequest(text="I loved it", top_k=2)
    assert sent["model"] == "default"
    assert before <= sent["submitted_at"] <= time.time()
    assert sent["deadline"] == pytest.approx(sent["submitted_at"] + 600.0)
    assert datetime.fromisoformat(record["deadline"]).timestamp() == pytest.approx(sent["deadline"])
    assert queued(r, "pagedq.translate") == [] and queued(r, "pagedq.qa") == []


def test_a_submission_does_not_wait_for_another_threads_task_sent_event(
    service: TaskService, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each submission publishes a `task-sent` event (Flower's "sent" state), a Redis round trip. Celery's one
    dispatcher per app publishes under a lock, so one slow publish held every other thread's submission (the
    HTTP API's threads, an app's threads sharing a client): here one thread's publish is stuck, and another
    thread's submission must still go through -- and both events are published."""
    from celery.events.dispatcher import EventDispatcher

    real = EventDispatcher._publish
    stuck, release, published = threading.Event(), threading.Event(), []

    def publish(self: EventDispatcher, event: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        published.append(dict(event))
        if threading.current_thread().name == "slow":
            stuck.set()
            release.wait(10)  # a Redis round trip that takes its time
        return real(self, event, *args, **kwargs)

    monkeypatch.setattr(EventDispatcher, "_publish", publish)
    slow = threading.Thread(target=service.submit, args=(TaskType.CLASSIFY, {"text": "slow"}), name="slow")
    slow.start()
    assert stuck.wait(10)
    done = threading.Event()
    fast = threading.Thread(target=lambda: (service.submit(TaskType.CLASSIFY, {"text": "fast"}), done.set()))
    fast.start()
    try:
        assert done.wait(5), "a submission waited for another thread's task-sent event"
    finally:
        release.set()
        slow.join(10)
        fast.join(10)
    sent = [e for e in published if e["type"] == "task-sent"]
    assert len(sent) == 2 and {e["name"] for e in sent} == {"pagedq.classify"}
    assert len(queued(r, "pagedq.classify")) == 2


@pytest.mark.parametrize(
    ("priority", "key"), list(zip((-100, -40, 40, 100), redis_queue_keys("pagedq.qa"), strict=True))
)
def test_priority_picks_the_kombu_sub_queue(service: TaskService, r: redis.Redis, priority: int, key: str) -> None:
    service.submit(TaskType.QA, {"question": "Who?", "context": "Ada.", "priority": priority})
    assert [k for k, _ in queued(r, "pagedq.qa")] == [key]


def test_timeout_sets_the_deadline(service: TaskService, r: redis.Redis) -> None:
    service.submit(TaskType.TRANSLATE, {"text": "Hello", "timeout_s": 30})
    [(_, message)] = queued(r, "pagedq.translate")
    [sent] = body_of(message)[0]
    assert sent["deadline"] == pytest.approx(sent["submitted_at"] + 30)


def test_a_request_model_instance_is_checked_against_the_service_limits(service: TaskService, r: redis.Redis) -> None:
    request = ClassifyRequest(text="x" * 101)  # fine under the default limits, too long for this service
    with pytest.raises(ValidationError, match="limit is 100"):
        service.submit(TaskType.CLASSIFY, request)
    with pytest.raises(TypeError, match="cannot be submitted as a classify task"):
        service.submit(TaskType.CLASSIFY, TranslateRequest(text="x"))
    assert r.dbsize() == 0


BAD_REQUESTS = [
    ({"text": ""}, "text must not be empty"),
    ({"text": "  \n\t"}, "text must not be empty"),
    ({"text": "x" * 101}, "the limit is 100"),
    ({"text": 42}, "valid string"),
    ({"text": "ok", "priority": "high"}, "valid integer"),
    ({"text": "ok", "priority": 101}, "less than or equal to 100"),
    ({"text": "ok", "colour": "red"}, "Extra inputs are not permitted"),
    ({"txt": "typo"}, "Field required"),
    ({"text": "ok", "timeout_s": 0}, "greater than 0"),
]


@pytest.mark.parametrize(("request_fields", "message"), BAD_REQUESTS)
def test_bad_input_leaves_no_trace(
    service: TaskService, r: redis.Redis, request_fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        service.submit(TaskType.CLASSIFY, request_fields)
    assert r.dbsize() == 0


def test_registry_picks_the_default_or_named_model(registered: TaskService, r: redis.Redis) -> None:
    default = registered.submit(TaskType.CLASSIFY, {"text": "a"})
    named = registered.submit(TaskType.CLASSIFY, {"text": "b", "model": "topics"})
    translated = registered.submit(TaskType.TRANSLATE, {"text": "c", "source_lang": "en", "target_lang": "de"})
    assert registered.status(default.id).model == "sentiment"
    assert registered.status(named.id).model == "topics"
    assert [body_of(m)[0][0]["model"] for _, m in queued(r, "pagedq.translate")] == ["en-de"]
    assert registered.status(translated.id).model == "en-de"


@pytest.mark.parametrize(
    ("task_type", "fields", "error", "message"),
    [
        (TaskType.CLASSIFY, {"text": "a", "model": "nope"}, ModelNotFound, "unknown model 'nope'"),
        (TaskType.CLASSIFY, {"text": "a", "model": "en-de"}, ModelNotFound, "serves translate"),
        (
            TaskType.TRANSLATE,
            {"text": "a", "source_lang": "en", "target_lang": "fr"},
            UnsupportedLanguagePair,
            "no model translates en -> fr",
        ),
        (
            TaskType.TRANSLATE,
            {"text": "a", "model": "en-de", "source_lang": "de", "target_lang": "en"},
            UnsupportedLanguagePair,
            "does not translate de -> en",
        ),
    ],
)
def test_registry_errors_leave_no_trace(
    registered: TaskService,
    r: redis.Redis,
    task_type: TaskType,
    fields: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        registered.submit(task_type, fields)
    assert r.dbsize() == 0


def test_registry_path_in_settings_is_loaded(settings: Settings, registry: Registry, tmp_path: Path) -> None:
    service = TaskService(settings.model_copy(update={"registry_path": tmp_path / "registry.toml"}))
    assert service.registry is not None and sorted(service.registry.models) == sorted(registry.models)


# -- bulk -----------------------------------------------------------------------------------------------


def test_bulk_records_and_sends_every_request_in_order(service: TaskService, r: redis.Redis) -> None:
    progress: list[tuple[int, int]] = []
    submitted = service.submit_bulk(
        TaskType.CLASSIFY,
        [{"text": f"t{i}"} for i in range(5)],
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert len({s.id for s in submitted}) == 5
    assert all(r.exists(KEY_PREFIX + s.id) for s in submitted)
    # one message of up to `bulk_message_items` items (here 2): 3 messages, each item with its own id
    messages = [m for _, m in reversed(queued(r, "pagedq.classify"))]  # LPUSH: the list holds the newest first
    assert [m["headers"]["task"] for m in messages] == ["pagedq.classify.batch"] * 3
    items = [item for m in messages for item in body_of(m)[0][0]["items"]]
    assert [i["id"] for i in items] == [s.id for s in submitted]
    assert [i["request"]["text"] for i in items] == [f"t{i}" for i in range(5)]
    assert all(i["deadline"] > i["submitted_at"] for i in items)
    assert messages[0]["headers"]["argsrepr"] == "<2 classify requests for 'default', priority 0>"  # Flower
    assert progress == [(2, 5), (5, 5)]  # per group: the first message alone (a worker starts on it), then the rest


def test_bulk_send_groups_double_so_workers_start_at_once(settings: Settings, r: redis.Redis) -> None:
    service = TaskService(settings.model_copy(update={"limits": Limits(max_text_chars=100, max_bulk=30)}))
    # 15 messages of 2 items: recorded and sent in groups of 1, 2, 4 and 8 messages, so the first message is
    # on the queue before the rest is recorded and the queue stays ahead of the workers
    progress: list[tuple[int, int]] = []
    submitted = service.submit_bulk(TaskType.CLASSIFY, [{"text": f"t{i}"} for i in range(30)],
                                    on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(2, 30), (6, 30), (14, 30), (30, 30)]
    items = [item for _, m in reversed(queued(r, "pagedq.classify")) for item in body_of(m)[0][0]["items"]]
    assert [i["id"] for i in items] == [s.id for s in submitted]


def test_bulk_messages_grow_from_one_engine_step(settings: Settings, r: redis.Redis) -> None:
    # the first message one engine step's worth (64: the worker's engine starts on it while the rest is
    # recorded), each next one twice the last, up to `bulk_message_items`
    service = TaskService(settings.model_copy(update={"bulk_message_items": 256,
                                                      "limits": Limits(max_text_chars=100, max_bulk=1000)}))
    submitted = service.submit_bulk(TaskType.CLASSIFY, [{"text": f"t{i}"} for i in range(1000)])
    messages = [body_of(m)[0][0]["items"] for _, m in reversed(queued(r, "pagedq.classify"))]
    assert [len(items) for items in messages] == [64, 128, 256, 256, 256, 40]
    assert [i["id"] for items in messages for i in items] == [s.id for s in submitted]


def test_a_bulk_message_holds_at_most_a_million_characters_of_text(
    settings: Settings, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # long QA contexts must not make messages of tens of MB: a message is cut at MESSAGE_TEXT_CHARS characters
    # of request text (here 25), and an item longer than that travels alone
    assert submission.MESSAGE_TEXT_CHARS == 1_000_000
    monkeypatch.setattr(submission, "MESSAGE_TEXT_CHARS", 25)
    service = TaskService(settings.model_copy(update={"bulk_message_items": 64}))
    texts = ["a" * 10, "b" * 10, "c" * 10, "d" * 40, "e" * 5]
    submitted = service.submit_bulk(TaskType.CLASSIFY, [{"text": t} for t in texts])
    messages = [body_of(m)[0][0]["items"] for _, m in reversed(queued(r, "pagedq.classify"))]
    assert [[i["request"]["text"][0] for i in items] for items in messages] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [i["id"] for items in messages for i in items] == [s.id for s in submitted]


def test_bulk_items_of_different_priorities_travel_apart(service: TaskService, r: redis.Redis) -> None:
    service.submit_bulk(TaskType.CLASSIFY, [{"text": "a", "priority": 50}, {"text": "b"}, {"text": "c"}])
    by_key = {key: [i["request"]["text"] for i in body_of(m)[0][0]["items"]] for key, m in queued(r, "pagedq.classify")}
    assert sorted(by_key.values()) == [["a"], ["b", "c"]]


def test_bulk_with_one_bad_item_enqueues_nothing(service: TaskService, r: redis.Redis) -> None:
    with pytest.raises(ValidationError) as caught:
        service.submit_bulk(TaskType.CLASSIFY, [{"text": "good"}, {"text": " "}, {"text": "good"}])
    assert [e["loc"] for e in caught.value.errors()] == [(1, "text")]
    assert r.dbsize() == 0


def test_bulk_registry_error_names_the_item(registered: TaskService, r: redis.Redis) -> None:
    with pytest.raises(ModelNotFound, match="request 1: unknown model 'nope'"):
        registered.submit_bulk(TaskType.CLASSIFY, [{"text": "a"}, {"text": "b", "model": "nope"}])
    assert r.dbsize() == 0


def test_bulk_over_the_limit_is_refused(service: TaskService, r: redis.Redis) -> None:
    with pytest.raises(InvalidRequest, match="at most 5 requests; got 6"):
        service.submit_bulk(TaskType.CLASSIFY, [{"text": "a"}] * 6)
    assert r.dbsize() == 0
    assert service.submit_bulk(TaskType.CLASSIFY, []) == []


# -- status ---------------------------------------------------------------------------------------------


def test_unknown_id_is_not_found(service: TaskService) -> None:
    with pytest.raises(TaskNotFound):
        service.status("no-such-task")
    with pytest.raises(TaskNotFound):
        service.statuses(["no-such-task"])


def test_queued_then_running_then_succeeded(service: TaskService) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi", "priority": -5}).id
    queued_status = service.status(task_id)
    assert queued_status.state is TaskState.QUEUED and queued_status.priority == -5
    assert queued_status.started_at is None and queued_status.finished_at is None
    assert queued_status.deadline is not None and queued_status.created_at < queued_status.deadline

    # What the worker does: it claims the task (started_at, worker), then finalizes it.
    assert service.records.claim(task_id, "worker@gpu0:1:a", "tag-1", LEASES) is Claim.RUN
    running = service.status(task_id)
    assert running.state is TaskState.RUNNING and running.started_at is not None and running.finished_at is None

    assert service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS) is TaskState.SUCCEEDED
    done = service.status(task_id)
    assert done.state is TaskState.SUCCEEDED and done.error is None
    assert isinstance(done.result, ClassifyResult) and done.result.label == "POSITIVE"
    assert done.finished_at is not None and done.finished_at >= done.started_at  # type: ignore[operator]


@pytest.mark.parametrize(
    ("exception", "state"),
    [
        (EngineError("CUDA out of memory"), TaskState.FAILED),
        (DeadlineExceeded("deadline passed while running"), TaskState.EXPIRED),
        (TaskCancelled("cancelled while running"), TaskState.CANCELLED),
        (ValueError("something else"), TaskState.FAILED),
    ],
)
def test_stored_errors_map_to_states(service: TaskService, exception: Exception, state: TaskState) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    service.records.finalize(task_id, state, error={"type": type(exception).__name__, "message": str(exception)})
    status = service.status(task_id)
    assert status.state is state and status.result is None
    assert status.error is not None
    assert (status.error.type, status.error.message) == (type(exception).__name__, str(exception))
    assert status.finished_at is not None


def test_a_malformed_result_is_a_failure(service: TaskService) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    service.records.finalize(task_id, TaskState.SUCCEEDED, result={"type": "classify", "label": 3})
    status = service.status(task_id)
    assert status.state is TaskState.FAILED and status.error is not None and status.error.type == "InvalidResult"


def test_the_first_final_state_wins_and_never_flips(service: TaskService, r: redis.Redis) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    channel = r.pubsub()
    channel.subscribe(f"pagedq:done:{task_id}")
    assert channel.get_message(timeout=1)["type"] == "subscribe"
    assert service.records.finalize(task_id, TaskState.FAILED, error={"type": "EngineError", "message": "x"}) \
        is TaskState.FAILED
    # a second delivery that finished later must not overwrite it
    assert service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS) is TaskState.FAILED
    assert service.status(task_id).state is TaskState.FAILED
    notice = json.loads(channel.get_message(timeout=1)["data"])  # finalize pushes the final fields to waiters
    assert notice["state"] == "failed" and json.loads(notice["error"])["type"] == "EngineError"
    assert channel.get_message(timeout=0.2) is None  # and only once
    assert r.zscore("pagedq:open", task_id) is None
    channel.close()


def test_claim_decides_each_delivery_once(service: TaskService, r: redis.Redis) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    r.set(LEASES + "w1", "alive")
    assert service.records.claim(task_id, "w1", "t1", LEASES) is Claim.RUN
    # a redelivery while w1 (alive) runs it: a duplicate, never a second run
    assert service.records.claim(task_id, "w2", "t2", LEASES) is Claim.OWNED
    assert service.records.claim(task_id, "w1", "t3", LEASES) is Claim.MINE  # w1 decides: running, or not
    assert service.records.claimed_by("w1") == {task_id: "t1"}
    # w1 dies (no lease): the task is released, then another worker may claim it
    r.delete(LEASES + "w1")
    assert service.records.release(task_id, "w1") and service.status(task_id).state is TaskState.QUEUED
    assert r.hget(KEY_PREFIX + task_id, "requeues") == "1" and service.records.claimed_by("w1") == {}
    assert service.records.claim(task_id, "w2", "t4", LEASES) is Claim.RUN
    assert not service.records.release(task_id, "w1")  # only the owner can hand it back
    service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)
    assert service.records.claimed_by("w2") == {}
    assert service.records.claim(task_id, "w3", "t5", LEASES) is Claim.FINAL
    assert service.records.claim("never-submitted", "w3", "t6", LEASES) is Claim.MISSING


def test_claim_and_finalize_read_a_record_once_and_tell_a_missing_one(service: TaskService, r: redis.Redis) -> None:
    """One HMGET per task decides a claim or a final write; EXISTS only for a key without any field they read
    (such a key is a record all the same), and a key that does not exist is missing for both."""
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    before = {k: v["calls"] for k, v in r.info("commandstats").items()}
    assert service.records.claim(task_id, "w1", "t1", LEASES) is Claim.RUN
    assert service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS) is TaskState.SUCCEEDED
    after = {k: v["calls"] for k, v in r.info("commandstats").items()}
    used = {k.removeprefix("cmdstat_"): after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert used.get("hmget") == 2 and "exists" not in used and "hget" not in used and "hexists" not in used
    assert r.hget(KEY_PREFIX + task_id, "deliveries") == "1"
    odd = "odd-record"  # a key holding none of the fields read: it exists, so it is claimed and finalized
    r.hset(KEY_PREFIX + odd, "something", "else")
    assert service.records.claim(odd, "w1", "t2", LEASES) is Claim.RUN
    assert service.records.finalize(odd, TaskState.SUCCEEDED, result=SUCCESS) is TaskState.SUCCEEDED
    assert r.hget(KEY_PREFIX + odd, "state") == "succeeded"
    r.delete(KEY_PREFIX + odd)
    assert service.records.claim("never-submitted", "w1", "t3", LEASES) is Claim.MISSING
    assert service.records.finalize("never-submitted", TaskState.SUCCEEDED, result=SUCCESS) is None
    assert not r.exists(KEY_PREFIX + "never-submitted")


def test_claim_finalizes_a_cancelled_or_expired_task_instead_of_running_it(service: TaskService) -> None:
    cancelled = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    service.records.request_cancel(cancelled)
    assert service.records.claim(cancelled, "w", "t1", LEASES) is Claim.CANCELLED
    assert service.status(cancelled).state is TaskState.CANCELLED
    late = service.submit(TaskType.CLASSIFY, {"text": "hi", "timeout_s": 0.01}).id
    time.sleep(0.02)
    assert service.records.claim(late, "w", "t2", LEASES) is Claim.EXPIRED
    status = service.status(late)
    assert status.state is TaskState.EXPIRED and status.error is not None
    assert status.error.type == "DeadlineExceeded"


def test_a_running_task_past_its_deadline_is_expired_for_good(service: TaskService) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi", "timeout_s": 0.2}).id
    assert service.records.claim(task_id, "w", "t1", LEASES) is Claim.RUN
    time.sleep(0.25)
    assert service.status(task_id).state is TaskState.EXPIRED  # whatever its worker is doing
    # the worker finishing later cannot flip it
    assert service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS) is TaskState.EXPIRED
    assert service.status(task_id).state is TaskState.EXPIRED


def test_a_queued_task_past_its_deadline_is_expired(service: TaskService) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi", "timeout_s": 0.01}).id
    time.sleep(0.02)
    status = service.status(task_id)
    assert status.state is TaskState.EXPIRED
    assert status.error is not None and status.error.type == "DeadlineExceeded"


def test_statuses_match_status(service: TaskService) -> None:
    ids = [s.id for s in service.submit_bulk(TaskType.CLASSIFY, [{"text": "a"}, {"text": "b"}, {"text": "c"}])]
    service.records.finalize(ids[1], TaskState.SUCCEEDED, result=SUCCESS)
    service.records.finalize(ids[2], TaskState.FAILED, error={"type": "EngineError", "message": "boom"})
    assert service.statuses(ids) == [service.status(i) for i in ids]
    assert [s.state for s in service.statuses(ids)] == [TaskState.QUEUED, TaskState.SUCCEEDED, TaskState.FAILED]


# -- cancel and wait ------------------------------------------------------------------------------------


def test_cancel_flags_the_record_and_broadcasts_a_revoke(service: TaskService, r: redis.Redis) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    control = r.pubsub()
    control.psubscribe("*pidbox*")  # where Celery broadcasts remote-control commands to workers
    assert control.get_message(timeout=1)["type"] == "psubscribe"

    status = service.cancel(task_id)

    assert status.state is TaskState.CANCELLED
    assert r.hget(KEY_PREFIX + task_id, "cancel_requested") == "1"
    command = json.loads(control.get_message(timeout=2)["data"])
    revoke = json.loads(base64.b64decode(command["body"]))
    assert revoke["method"] == "revoke" and revoke["arguments"]["task_id"] == task_id
    assert not revoke["arguments"].get("terminate")
    control.close()


def test_cancel_of_a_finished_task_is_refused(service: TaskService, r: redis.Redis) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)
    with pytest.raises(TaskAlreadyFinished, match="already finished"):
        service.cancel(task_id)
    assert r.hget(KEY_PREFIX + task_id, "cancel_requested") is None
    with pytest.raises(TaskNotFound):
        service.cancel("no-such-task")


def test_wait_returns_a_final_status_or_times_out(service: TaskService) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        service.wait(task_id, timeout_s=0.3, poll_interval=0.05)
    assert time.monotonic() - started < 1.0
    service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)
    assert service.wait(task_id, timeout_s=1).state is TaskState.SUCCEEDED


# -- the Python client ----------------------------------------------------------------------------------


def test_client_handles_give_typed_results_and_errors(settings: Settings, r: redis.Redis) -> None:
    with Client(settings=settings, poll_interval=0.05) as client:
        good = client.classify("I loved it", top_k=1)
        bad = client.translate("Hallo", source_lang="de", target_lang="en")
        client.service.records.finalize(good.id, TaskState.SUCCEEDED, result=SUCCESS)
        client.service.records.finalize(bad.id, TaskState.FAILED,
                                        error={"type": "EngineError", "message": "model crashed"})

        assert good.result(timeout=1).label == "POSITIVE"
        with pytest.raises(TaskFailed) as caught:
            bad.result(timeout=1)
        assert caught.value.state is TaskState.FAILED
        assert caught.value.error.type == "EngineError" and caught.value.error.message == "model crashed"
        assert good.status().state is TaskState.SUCCEEDED


def test_client_validates_before_sending(settings: Settings, r: redis.Redis) -> None:
    with Client(settings=settings) as client:
        with pytest.raises(ValidationError, match="text must not be empty"):
            client.classify("   ")
        with pytest.raises(ValidationError, match="context"):
            client.qa("Who?", "")
        with pytest.raises(ValidationError, match=r"1\.text"):
            client.bulk_classify(["fine", ""])
        with pytest.raises(TypeError, match="needs its task_type"):
            client.submit({"text": "x"})
    assert r.dbsize() == 0


def test_client_submit_bulk_wait_and_cancel(settings: Settings, r: redis.Redis) -> None:
    with Client(settings.redis_url, settings, poll_interval=0.05) as client:
        single = client.submit(TranslateRequest(text="Hello", target_lang="de"))
        handles = client.bulk_qa([("Who?", "Ada."), ("When?", "1843.")], priority=10)
        assert single.type is TaskType.TRANSLATE and [h.type for h in handles] == [TaskType.QA] * 2
        [(_, batch)] = queued(r, "pagedq.qa")  # a bulk of 2 travels as one message of 2 items
        assert [i["id"] for i in body_of(batch)[0][0]["items"]] == [h.id for h in handles]
        assert len(queued(r, "pagedq.translate")) == 1

        assert handles[0].cancel().state is TaskState.CANCELLED
        with pytest.raises(TaskFailed) as caught:
            handles[0].result(timeout=1)
        assert caught.value.state is TaskState.CANCELLED
        with pytest.raises(TimeoutError):
            client.wait_all([h.id for h in handles], timeout=0.2)


def test_the_producer_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys, pagedq.producer, pagedq.producer.client, pagedq.producer.cli, pagedq.producer.service\n"
        "assert 'fastapi' not in sys.modules, 'the client install must not need the api extra'\n"
        "import pagedq.producer.api\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_failed_send_leaves_no_record(redis_url: str, r: redis.Redis) -> None:
    """Records live in the result backend's Redis; the broker here is a closed port, so sending fails."""
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    service = TaskService(Settings(redis_url=dead_broker, result_redis_url=redis_url, registry_path=None))
    service.celery.conf.task_publish_retry = False  # fail at once instead of retrying the connection
    service.celery.conf.broker_transport_options = {**service.celery.conf.broker_transport_options, "max_retries": 0}
    with pytest.raises(OperationalError):
        service.submit(TaskType.CLASSIFY, {"text": "hi"})
    with pytest.raises(OperationalError):
        service.submit_bulk(TaskType.CLASSIFY, [{"text": "a"}, {"text": "b"}])
    assert r.keys(KEY_PREFIX + "*") == []


def test_a_record_only_a_worker_marked_is_not_a_task(service: TaskService, r: redis.Redis) -> None:
    r.hset(KEY_PREFIX + "left-over", mapping={"started_at": "2030-01-01T00:00:00+00:00", "worker": "w@h"})
    with pytest.raises(TaskNotFound):
        service.status("left-over")


# -- pushed completion ----------------------------------------------------------------------------------


def test_wait_is_woken_by_the_final_state_not_by_polling(service: TaskService) -> None:
    ids = [s.id for s in service.submit_bulk(TaskType.CLASSIFY, [{"text": "a"}, {"text": "b"}])]
    finisher = threading.Timer(0.3, lambda: [service.records.finalize(i, TaskState.SUCCEEDED, result=SUCCESS)
                                             for i in ids])
    finisher.start()
    # the first fallback read would come after 60 s: only the notification can end this wait in time
    statuses = service.wait_all(ids, timeout_s=10, poll_interval=60)
    assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 2
    assert statuses[0].result == ClassifyResult.model_validate(SUCCESS)
    assert statuses == service.statuses(ids)  # built from the notice, equal to what a read says
    finisher.join()


def test_wait_falls_back_to_reading_when_a_notification_is_missed(service: TaskService, r: redis.Redis) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    # a final state written without its notification (as if the waiter was reconnecting when it was sent)
    threading.Timer(0.2, lambda: r.hset(KEY_PREFIX + task_id, mapping={
        "state": "succeeded", "result": json.dumps(SUCCESS), "finished_at": "2030-01-01T00:00:00+00:00"})).start()
    assert service.wait(task_id, timeout_s=5, poll_interval=0.1).state is TaskState.SUCCEEDED


def test_wait_sees_tasks_that_finished_before_it_subscribed(service: TaskService) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    service.records.finalize(task_id, TaskState.FAILED, error={"type": "EngineError", "message": "x"})
    assert service.wait(task_id, timeout_s=5, poll_interval=60).state is TaskState.FAILED


def test_wait_expires_a_queued_task_at_its_deadline(service: TaskService) -> None:
    task_id = service.submit(TaskType.CLASSIFY, {"text": "hi", "timeout_s": 0.3}).id
    assert service.wait(task_id, timeout_s=5, poll_interval=0.1).state is TaskState.EXPIRED


# -- the reply channel of a listening producer (the Python client) --------------------------------------


@pytest.fixture()
def listening(settings: Settings) -> Any:
    service = TaskService(settings, listen=True)
    yield service
    service.close()


def test_a_listening_producer_waits_on_its_reply_channel_without_a_subscription_per_task(
    listening: TaskService, service: TaskService, r: redis.Redis
) -> None:
    task_id = listening.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    channel = r.hget(KEY_PREFIX + task_id, "notify")
    assert channel is not None and channel.startswith("pagedq:reply:")
    subscribed: list[int] = []

    def finish() -> None:  # another process (here: another producer) writes the final state
        subscribed.append(r.pubsub_numsub(f"pagedq:done:{task_id}")[0][1])
        service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)

    finisher = threading.Timer(0.3, finish)
    finisher.start()
    start = time.monotonic()
    status = listening.wait(task_id, timeout_s=10, poll_interval=60)  # no fallback read within the test
    assert status.state is TaskState.SUCCEEDED and time.monotonic() - start < 3  # a full read comes at 5 s
    assert subscribed == [0]  # nobody subscribed to the task's own channel: the notice came on the reply channel
    assert status == service.statuses([task_id])[0]  # built from the notice, equal to what a read says
    finisher.join()
    # a producer that did not submit it waits by the task's own channel, and sees the same
    assert service.wait(task_id, timeout_s=5) == status


def test_a_bulk_finalized_at_once_sends_one_reply_with_every_item(
    listening: TaskService, service: TaskService, r: redis.Redis
) -> None:
    ids = [s.id for s in listening.submit_bulk(TaskType.CLASSIFY, [{"text": "a"}, {"text": "b"}, {"text": "c"}])]
    sniffer = r.pubsub(ignore_subscribe_messages=True)
    sniffer.subscribe(r.hget(KEY_PREFIX + ids[0], "notify"))
    sniffer.get_message(timeout=1.0)
    states = service.records.finalize_many([Outcome(ids[0], TaskState.SUCCEEDED, SUCCESS),
                                            Outcome(ids[1], TaskState.FAILED, None, {"type": "E", "message": "m"}),
                                            Outcome(ids[2], TaskState.SUCCEEDED, SUCCESS)])
    assert states == [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.SUCCEEDED]
    message = sniffer.get_message(timeout=2.0)
    assert message is not None and [n["id"] for n in json.loads(message["data"])] == ids
    assert sniffer.get_message(timeout=0.2) is None  # one message for the three
    sniffer.close()
    statuses = listening.wait_all(ids, timeout_s=5, poll_interval=60)
    assert [s.state for s in statuses] == [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.SUCCEEDED]
    assert statuses == service.statuses(ids)


def test_a_listening_producer_shared_by_threads_wakes_each_waiter(listening: TaskService, service: TaskService) -> None:
    ids = [listening.submit(TaskType.CLASSIFY, {"text": f"t{i}"}).id for i in range(4)]
    results: dict[str, TaskState] = {}

    def wait(task_id: str) -> None:
        results[task_id] = listening.wait(task_id, timeout_s=10, poll_interval=60).state

    waiters = [threading.Thread(target=wait, args=(t,)) for t in ids]
    for waiter in waiters:
        waiter.start()
    for task_id in reversed(ids):  # one at a time, the last first
        time.sleep(0.1)
        service.records.finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)
    for waiter in waiters:
        waiter.join(timeout=10)
    assert results == {t: TaskState.SUCCEEDED for t in ids}


def test_a_listening_producer_falls_back_to_reading_when_its_reply_is_missed(
    listening: TaskService, r: redis.Redis
) -> None:
    task_id = listening.submit(TaskType.CLASSIFY, {"text": "hi"}).id
    threading.Timer(0.2, lambda: r.hset(KEY_PREFIX + task_id, mapping={
        "state": "succeeded", "result": json.dumps(SUCCESS), "finished_at": "2030-01-01T00:00:00+00:00"})).start()
    assert listening.wait(task_id, timeout_s=5, poll_interval=0.1).state is TaskState.SUCCEEDED


def test_a_listening_producer_survives_losing_its_subscription(listening: TaskService, service: TaskService,
                                                               r: redis.Redis) -> None:
    first = listening.submit(TaskType.CLASSIFY, {"text": "a"}).id
    r.client_kill_filter(_type="pubsub")  # as in a Redis restart: the reply channel's connection drops
    service.records.finalize(first, TaskState.SUCCEEDED, result=SUCCESS)  # published while nobody listens
    assert listening.wait(first, timeout_s=10, poll_interval=0.2).state is TaskState.SUCCEEDED  # read instead
    second = listening.submit(TaskType.CLASSIFY, {"text": "b"}).id
    threading.Timer(0.3, lambda: service.records.finalize(second, TaskState.SUCCEEDED, result=SUCCESS)).start()
    start = time.monotonic()
    assert listening.wait(second, timeout_s=10, poll_interval=60).state is TaskState.SUCCEEDED
    assert time.monotonic() - start < 3  # pushed again (a full read comes at 5 s): the subscription is back


def test_many_threads_of_one_process_can_send_at_once(settings: Settings) -> None:
    """Every app of a process shares kombu's producer pool on a broker; with Celery's default limit (10) an
    eleventh thread submitting at the same time waits for a producer. pagedq's limit (`broker_pool_limit`,
    64) lets a web server's threadpool send side by side."""
    held: list[Any] = []
    service = TaskService(settings)
    pool = service.celery.producer_pool

    def grab() -> None:
        for _ in range(32):
            held.append(pool.acquire(block=True))  # blocks once the pool is exhausted

    grabber = threading.Thread(target=grab, daemon=True)
    grabber.start()
    grabber.join(10)
    try:
        assert len(held) == 32, f"only {len(held)} threads could hold a producer at once"
    finally:
        for producer in list(held):
            producer.release()
        service.close()


def test_records_keep_any_text_exactly(listening: TaskService, service: TaskService, r: redis.Redis) -> None:
    """Records and final states travel to Redis as one JSON argument per call: text with quotes, backslashes,
    newlines and non-ASCII comes back as sent (the stored message re-sends the same request), and so does an
    error message holding a lone surrogate (which only a worker's exception can carry)."""
    texts = ['say "hi" \\ back\nslash', "naïve café — 東京 🙂", "tab\there"]
    ids = [s.id for s in listening.submit_bulk(TaskType.CLASSIFY, [{"text": t} for t in texts])]
    for task_id, text in zip(ids, texts, strict=True):
        record = r.hgetall(KEY_PREFIX + task_id)
        assert json.loads(record["message"])["request"] == {"text": text}
        assert record["type"] == "classify" and record["priority"] == "0" and float(record["deadline_ts"]) > time.time()
    label = 'POSITIVE "très" \\ 東京'
    result = {**SUCCESS, "label": label, "scores": [{"label": label, "score": 0.9}]}
    error = {"type": "ModelError", "message": "bad token \ud800 in 'x'"}
    states = service.records.finalize_many([Outcome(ids[0], TaskState.SUCCEEDED, result),
                                            Outcome(ids[1], TaskState.FAILED, None, error),
                                            Outcome(ids[2], TaskState.SUCCEEDED, result)])
    assert states == [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.SUCCEEDED]
    statuses = listening.wait_all(ids, timeout_s=5, poll_interval=60)  # from the reply channel's notices
    assert statuses == service.statuses(ids)  # equal to what a read of the records says
    assert statuses[0].result is not None and statuses[0].result.label == label  # type: ignore[union-attr]
    assert statuses[1].error is not None and statuses[1].error.message == error["message"]


def test_a_bulk_of_long_inputs_is_recorded_in_several_calls(service: TaskService, r: redis.Redis,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Records travel in calls of bounded size (Redis refuses one string over 512 MB; a bulk of long QA
    contexts could reach that): every record arrives whole, whatever the split."""
    from pagedq.shared import records as records_module

    monkeypatch.setattr(records_module, "CREATE_CHUNK_CHARS", 150)  # each message is ~140 characters: one a call
    calls: list[int] = []
    real = service.records._create

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["keys"]) - 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(service.records, "_create", counting)
    texts = [f"text number {i} " + "x" * 40 for i in range(5)]
    ids = [s.id for s in service.submit_bulk(TaskType.CLASSIFY, [{"text": t} for t in texts])]
    assert calls == [1] * 5  # without the size bound: one call per send group (2 and 3 records)
    for task_id, text in zip(ids, texts, strict=True):
        assert json.loads(r.hget(KEY_PREFIX + task_id, "message"))["request"] == {"text": text}  # type: ignore[arg-type]
