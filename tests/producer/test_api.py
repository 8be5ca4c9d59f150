"""The HTTP API (FastAPI TestClient) and HTTPClient against a real private Redis; no worker runs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from pagedq.producer.api import create_app
from pagedq.producer.client import APIError, HTTPClient, TaskFailed
from pagedq.producer.http_client import parse_sse
from pagedq.shared.celery_config import PRIORITY_SEP as SEP
from pagedq.shared.celery_config import redis_queue_keys
from pagedq.shared.models import ClassifyResult, TaskState
from pagedq.shared.records import KEY_PREFIX, LEASE_PREFIX, WORKERS_KEY, TaskRecords, stream_key
from pagedq.shared.redis_server import free_port
from pagedq.shared.settings import Limits, Settings

KEY = "s3cret"
AUTH = {"X-API-Key": KEY}
REGISTRY_TOML = """
[models.sentiment]
task = "classify"
source = "./sentiment"

[models.en-de]
task = "translate"
source = "./en-de"
languages = ["en-de"]

[models.squad]
task = "qa"
source = "./squad"
"""
SUCCESS = {"type": "classify", "model": "sentiment", "label": "NEGATIVE", "score": 0.8, "scores": []}


def queued_count(r: redis.Redis) -> int:
    """Messages waiting on any pagedq queue, in any kombu priority sub-queue."""
    return sum(r.llen(k) for t in ("classify", "translate", "qa") for k in redis_queue_keys(f"pagedq.{t}"))


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture()
def settings(redis_url: str, tmp_path: Path) -> Settings:
    registry = tmp_path / "registry.toml"
    registry.write_text(REGISTRY_TOML)
    return Settings(
        redis_url=redis_url,
        registry_path=registry,
        api_keys=[KEY, "other-key"],
        limits=Limits(max_text_chars=50, max_bulk=3, max_body_bytes=4096, max_json_depth=8),
    )


@pytest.fixture()
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def records(api: TestClient) -> TaskRecords:
    """The task records, where a worker writes a task's outcome."""
    return api.app.state.service.records  # type: ignore[attr-defined,no-any-return]


# -- submission -----------------------------------------------------------------------------------------


def test_submit_returns_202_with_location_and_enqueues_one_message(api: TestClient, r: redis.Redis) -> None:
    response = api.post("/v1/classify", json={"text": "Terrible film", "top_k": 2}, headers=AUTH)
    assert response.status_code == 202
    body = response.json()
    assert body["state"] == "queued" and body["type"] == "classify"
    assert response.headers["location"] == body["location"] == f"/v1/tasks/{body['id']}"
    assert r.hget(KEY_PREFIX + body["id"], "model") == "sentiment"
    assert r.llen("pagedq.classify" + SEP + "3") == 1 and queued_count(r) == 1


@pytest.mark.parametrize(
    ("path", "body", "queue"),
    [
        ("/v1/translate", {"text": "Hello", "source_lang": "en", "target_lang": "de"}, "pagedq.translate" + SEP + "3"),
        ("/v1/qa", {"question": "Who?", "context": "Ada wrote it.", "priority": -100}, "pagedq.qa"),
    ],
)
def test_translate_and_qa(api: TestClient, r: redis.Redis, path: str, body: dict[str, Any], queue: str) -> None:
    assert api.post(path, json=body, headers=AUTH).status_code == 202
    assert r.llen(queue) == 1 and queued_count(r) == 1


BAD_BODIES = [
    ("/v1/classify", {"text": ""}, "text: text must not be empty or whitespace"),
    ("/v1/classify", {"text": "   "}, "text: text must not be empty or whitespace"),
    ("/v1/classify", {"text": "x" * 51}, "text: text is 51 characters; the limit is 50"),
    ("/v1/classify", {"text": ["a"]}, "text: Input should be a valid string"),
    ("/v1/classify", {"text": "ok", "top_k": "two"}, "top_k: Input should be a valid integer"),
    ("/v1/classify", {"text": "ok", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ("/v1/classify", {}, "text: Field required"),
    ("/v1/classify", ["text"], "body: Input should be a valid dictionary"),
    ("/v1/translate", {"text": "ok", "generation": {"num_beams": 2, "do_sample": True}}, "generation: choose either"),
    ("/v1/qa", {"question": "Who?", "context": ""}, "context: context must not be empty"),
]


@pytest.mark.parametrize(("path", "body", "message"), BAD_BODIES)
def test_invalid_bodies_are_422_naming_the_field_and_enqueue_nothing(
    api: TestClient, r: redis.Redis, path: str, body: Any, message: str
) -> None:
    response = api.post(path, json=body, headers=AUTH)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "ValidationError" and message in error["message"]
    assert r.dbsize() == 0


def test_invalid_json_is_400(api: TestClient, r: redis.Redis) -> None:
    for raw in [b'{"text": "unterminated', b'{"text": "ok", "timeout_s": NaN}', b'{"text": "\xff"}']:
        response = api.post("/v1/classify", content=raw, headers=AUTH)
        assert response.status_code == 400, raw
        assert response.json()["error"]["type"] == "InvalidJSON"
        assert "not valid JSON" in response.json()["error"]["message"]
    assert r.dbsize() == 0


JSON = {**AUTH, "Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("path", "raw", "message"),
    [
        ("/v1/classify", rb'{"text": "a\ud800b"}', "text: text is not valid Unicode: a lone surrogate"),
        ("/v1/translate", rb'{"text": "\udfff"}', "text: text is not valid Unicode"),
        ("/v1/qa", rb'{"question": "\ud800?", "context": "c"}', "question: question is not valid Unicode"),
        ("/v1/qa", rb'{"question": "q", "context": "c\udc00"}', "context: context is not valid Unicode"),
        ("/v1/qa/bulk", rb'{"requests": [{"question": "q", "context": "\ud800"}]}', "requests.0.context: context is"),
        ("/v1/classify", rb'{"text": "ok", "model": "\ud800"}', "model: Input should be a valid string"),
        ("/v1/classify", rb'{"text": "ok", "\ud800": 1}', "body: Input should be a valid string"),  # a key
    ],
)
def test_lone_surrogates_are_422_and_enqueue_nothing(
    api: TestClient, r: redis.Redis, path: str, raw: bytes, message: str
) -> None:
    """Valid JSON, but no tokenizer can take it: refused before the queue (it used to kill the worker)."""
    response = api.post(path, content=raw, headers=JSON)
    assert response.status_code == 422
    assert message in response.json()["error"]["message"]
    assert r.dbsize() == 0


def test_a_pair_of_surrogates_is_one_character(api: TestClient) -> None:
    assert api.post("/v1/classify", content=rb'{"text": "\ud83d\ude00"}', headers=JSON).status_code == 202


def test_sampling_needs_a_usable_temperature(api: TestClient, r: redis.Redis) -> None:
    sampled = {"text": "Hi", "generation": {"do_sample": True, "temperature": 1e-300}}
    response = api.post("/v1/translate", json=sampled, headers=AUTH)
    assert response.status_code == 422
    assert "temperature is 1e-300; sampling needs at least 0.01" in response.json()["error"]["message"]
    assert r.dbsize() == 0
    greedy = {"text": "Hi", "generation": {"do_sample": False, "temperature": 1e-300}}  # ignored for greedy
    assert api.post("/v1/translate", json=greedy, headers=AUTH).status_code == 202
    at_least = {"text": "Hi", "generation": {"do_sample": True, "temperature": 0.01}}
    assert api.post("/v1/translate", json=at_least, headers=AUTH).status_code == 202


def test_json_types_are_strict_but_integral_numbers_are_integers(api: TestClient, r: redis.Redis) -> None:
    for loose in [{"text": "ok", "truncate": 0}, {"text": "ok", "priority": "5"}, {"text": "ok", "top_k": True}]:
        assert api.post("/v1/classify", json=loose, headers=AUTH).status_code == 422, loose
    assert r.dbsize() == 0
    assert api.post("/v1/classify", json={"text": "ok", "priority": 5.0, "top_k": 2e0}, headers=AUTH).status_code == 202


# -- body limits ----------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_before_parsing(api: TestClient, r: redis.Redis) -> None:
    big = b'{"text": "' + b"x" * 4096 + b'"}'
    response = api.post("/v1/classify", content=big, headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"] == {
        "type": "BodyTooLarge",
        "message": f"the request body is {len(big)} bytes; the limit is 4096",
    }
    chunked = api.post("/v1/classify", content=iter([big[:2000], big[2000:]]), headers=JSON)  # no Content-Length
    assert chunked.status_code == 413 and "over the limit of 4096 bytes" in chunked.json()["error"]["message"]
    assert r.dbsize() == 0


@pytest.mark.parametrize("depth", [8, 2_000])
def test_json_nested_too_deep_is_400_not_500(api: TestClient, r: redis.Redis, depth: int) -> None:
    raw = b'{"text": ' + b"[" * depth + b"]" * depth + b"}"  # depth + 1 levels with the object
    response = api.post("/v1/classify", content=raw, headers=JSON)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "JSONTooDeep",
        "message": "the request body nests arrays/objects more than 8 levels deep",
    }
    assert r.dbsize() == 0


def test_json_at_the_depth_limit_is_parsed(api: TestClient) -> None:
    raw = rb'{"text": "[[[{\"a\": [[[[[[[[[[", "truncate": ' + b"[" * 7 + b"]" * 7 + b"}"  # brackets in a string
    response = api.post("/v1/classify", content=raw, headers=JSON)
    assert response.status_code == 422 and "truncate: Input should be a valid boolean" in response.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_json_is_415(api: TestClient, r: redis.Redis, content_type: str) -> None:
    for path in ("/v1/classify", "/v1/qa/bulk"):
        response = api.post(path, content=b'{"text": "ok"}', headers={**AUTH, "Content-Type": content_type})
        assert response.status_code == 415
        assert response.json()["error"]["type"] == "UnsupportedMediaType"
        assert "Content-Type: application/json" in response.json()["error"]["message"]
    assert r.dbsize() == 0


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", "application/x+json"])
def test_json_media_types_are_accepted(api: TestClient, content_type: str) -> None:
    headers = {**AUTH, "Content-Type": content_type}
    assert api.post("/v1/classify", content=b'{"text": "ok"}', headers=headers).status_code == 202


def test_a_wrong_method_is_405_naming_every_method_of_the_path(api: TestClient) -> None:
    response = api.request("PUT", "/v1/tasks/some-id", headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == "GET, DELETE"
    assert response.json()["error"]["type"] == "MethodNotAllowed"
    assert api.request("GET", "/v1/classify", headers=AUTH).headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "message"),
    [
        ("/v1/classify", {"text": "a", "model": "gpt-9"}, 404, "ModelNotFound", "unknown model 'gpt-9'"),
        (
            "/v1/translate",
            {"text": "a", "source_lang": "en", "target_lang": "ja"},
            422,
            "UnsupportedLanguagePair",
            "no model translates en -> ja",
        ),
        ("/v1/qa", {"question": "Who?", "context": "Ada.", "mode": "generative"}, 404, "ModelNotFound", "no qa model"),
    ],
)
def test_registry_errors(
    api: TestClient, r: redis.Redis, path: str, body: dict[str, Any], status: int, error_type: str, message: str
) -> None:
    response = api.post(path, json=body, headers=AUTH)
    assert response.status_code == status
    assert response.json()["error"]["type"] == error_type and message in response.json()["error"]["message"]
    assert r.dbsize() == 0


# -- bulk -----------------------------------------------------------------------------------------------


def test_bulk_submits_all(api: TestClient, r: redis.Redis) -> None:
    body = {"requests": [{"text": "a"}, {"text": "b", "priority": 100}, {"text": "c"}]}
    response = api.post("/v1/classify/bulk", json=body, headers=AUTH)
    assert response.status_code == 202
    tasks = response.json()["tasks"]
    assert len(tasks) == 3 and all(t["state"] == "queued" for t in tasks)
    # One batch message per priority (of up to `bulk_message_items` items), each item with its own record.
    assert r.llen("pagedq.classify" + SEP + "3") == 1 and r.llen("pagedq.classify" + SEP + "9") == 1
    assert all(r.exists(KEY_PREFIX + t["id"]) for t in tasks)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"requests": [{"text": "a"}, {"text": ""}]}, 422, "requests.1.text: text must not be empty"),
        ({"requests": [{"text": "a"}, {"text": "b", "model": "nope"}]}, 404, "request 1: unknown model 'nope'"),
        ({"requests": [{"text": "a"}] * 4}, 422, "at most 3 requests; got 4"),
        ({"requests": "a"}, 422, "requests: Input should be a valid list"),
        ({"texts": ["a"]}, 422, "requests: Field required"),
    ],
)
def test_bulk_with_a_bad_item_enqueues_nothing(
    api: TestClient, r: redis.Redis, body: dict[str, Any], status: int, message: str
) -> None:
    response = api.post("/v1/classify/bulk", json=body, headers=AUTH)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert r.dbsize() == 0


def test_bodies_validated_in_the_threadpool_answer_alike(api: TestClient, r: redis.Redis,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Bodies over `INLINE_BODY_BYTES` are parsed in the threadpool (small ones on the event loop): the same
    answers either way."""
    from pagedq.producer import api_body

    monkeypatch.setattr(api_body, "INLINE_BODY_BYTES", 0)
    bad = api.post("/v1/classify/bulk", json={"requests": [{"text": "a"}, {"text": ""}]}, headers=AUTH)
    assert bad.status_code == 422 and "requests.1.text: text must not be empty" in bad.json()["error"]["message"]
    assert api.post("/v1/classify", json={"text": ""}, headers=AUTH).status_code == 422
    assert r.dbsize() == 0
    assert api.post("/v1/classify", json={"text": "fine"}, headers=AUTH).status_code == 202
    assert api.post("/v1/classify/bulk", json={"requests": [{"text": "a"}]}, headers=AUTH).status_code == 202


# -- status and cancel ----------------------------------------------------------------------------------


def test_status_of_unknown_id_is_404(api: TestClient) -> None:
    response = api.get("/v1/tasks/0b6c5a8e-0000-4000-8000-000000000000", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "TaskNotFound"


def test_status_follows_the_task_record(api: TestClient) -> None:
    task_id = api.post("/v1/classify", json={"text": "meh"}, headers=AUTH).json()["id"]
    assert api.get(f"/v1/tasks/{task_id}", headers=AUTH).json()["state"] == "queued"
    records(api).finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)
    status = api.get(f"/v1/tasks/{task_id}", headers=AUTH).json()
    assert status["state"] == "succeeded" and status["model"] == "sentiment"
    assert status["result"]["label"] == "NEGATIVE" and status["finished_at"] is not None


def test_cancel(api: TestClient, r: redis.Redis) -> None:
    task_id = api.post("/v1/classify", json={"text": "meh"}, headers=AUTH).json()["id"]
    response = api.delete(f"/v1/tasks/{task_id}", headers=AUTH)
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert r.hget(KEY_PREFIX + task_id, "cancel_requested") == "1"

    again = api.delete(f"/v1/tasks/{task_id}", headers=AUTH)
    assert again.status_code == 409 and "already finished (cancelled)" in again.json()["error"]["message"]
    assert api.delete("/v1/tasks/unknown", headers=AUTH).status_code == 404


def test_cancel_of_a_succeeded_task_is_409(api: TestClient, r: redis.Redis) -> None:
    task_id = api.post("/v1/classify", json={"text": "meh"}, headers=AUTH).json()["id"]
    records(api).finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)
    response = api.delete(f"/v1/tasks/{task_id}", headers=AUTH)
    assert response.status_code == 409
    assert response.json()["error"] == {
        "type": "TaskAlreadyFinished",
        "message": f"task {task_id} already finished (succeeded); nothing to cancel",
    }
    assert r.hget(KEY_PREFIX + task_id, "cancel_requested") is None


# -- auth -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"X-API-Key": "wrong"}, "invalid API key"),
        ({"Authorization": "Bearer wrong"}, "invalid API key"),
        ({"Authorization": f"Basic {KEY}"}, "missing API key"),
    ],
)
def test_missing_or_wrong_key_is_401(api: TestClient, r: redis.Redis, headers: dict[str, str], message: str) -> None:
    for method, path, body in [
        ("POST", "/v1/classify", {"text": ""}),
        ("GET", "/v1/tasks/x", None),
        ("DELETE", "/v1/tasks/x", None),
        ("POST", "/v1/qa/bulk", {"requests": []}),
    ]:
        response = api.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["type"] == "Unauthorized"
        assert message in response.json()["error"]["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert r.dbsize() == 0


def test_either_key_header_works(api: TestClient) -> None:
    assert api.post("/v1/classify", json={"text": "a"}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 202
    assert api.post("/v1/classify", json={"text": "a"}, headers={"X-API-Key": "other-key"}).status_code == 202


def test_auth_enabled_without_keys_fails_closed(settings: Settings, r: redis.Redis) -> None:
    with TestClient(create_app(settings.model_copy(update={"api_keys": []}))) as api:
        response = api.post("/v1/classify", json={"text": "a"}, headers={"X-API-Key": ""})
        assert response.status_code == 401
        assert "no API keys are configured" in response.json()["error"]["message"]
        assert api.get("/healthz").status_code == 200
    assert r.dbsize() == 0


def test_auth_disabled(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"auth_enabled": False, "api_keys": []}))) as api:
        assert api.post("/v1/classify", json={"text": "a"}).status_code == 202


def test_open_routes_need_no_key(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/docs").status_code == 200
    schema = api.get("/openapi.json").json()
    assert {"ClassifyRequest", "TranslateRequest", "QARequest", "ClassifyBulkRequest"} <= set(
        schema["components"]["schemas"]
    )
    submit = schema["paths"]["/v1/classify"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ClassifyRequest")
    assert {"APIKeyHeader", "HTTPBearer"} <= {name for s in submit["security"] for name in s}


# -- readiness ------------------------------------------------------------------------------------------


def test_readyz_is_503_without_a_worker(api: TestClient) -> None:
    response = api.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["redis"]["ok"] is True
    assert checks["workers"]["ok"] is False and "no worker holds a live lease" in checks["workers"]["detail"]


def test_readyz_follows_the_workers_leases(api: TestClient, r: redis.Redis) -> None:
    """What worker/lease.py writes every second: a lease that expires, listed in pagedq:workers."""
    def lease(worker: str, ready: bool, ttl_ms: int = 60_000) -> None:
        r.zadd(WORKERS_KEY, {worker: time.time()})
        r.set(LEASE_PREFIX + worker, json.dumps({"hostname": worker.split(":")[0], "ready": ready}), px=ttl_ms)

    lease("w1@gpu0:11:aa", ready=False)  # its engine thread is down: not ready
    assert api.get("/readyz").status_code == 503
    lease("w2@gpu1:12:bb", ready=True)
    started = time.monotonic()
    response = api.get("/readyz")
    assert response.status_code == 200 and response.json()["checks"]["workers"]["workers"] == ["w2@gpu1"]
    assert time.monotonic() - started < 0.5  # read from Redis, no broadcast that waits for replies
    lease("w2@gpu1:12:bb", ready=True, ttl_ms=1)  # the lease lapses: the worker died
    time.sleep(0.05)
    assert api.get("/readyz").status_code == 503


def test_readyz_is_503_without_redis(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as api:
        response = api.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"]["redis"]["ok"] is False
        assert api.get("/healthz").status_code == 200
        submit = api.post("/v1/classify", json={"text": "a"}, headers=AUTH)
        assert submit.status_code == 503 and submit.json()["error"]["type"] == "ServiceUnavailable"


# -- HTTPClient -----------------------------------------------------------------------------------------


def test_http_client_round_trip(api: TestClient, r: redis.Redis) -> None:
    client = HTTPClient("http://testserver", KEY, http=api)
    handle = client.classify("Dreadful", top_k=1)
    bulk = client.bulk_translate(["Hello", "Bye"], source_lang="en", target_lang="de")
    assert queued_count(r) == 2 and client.status(handle.id).state is TaskState.QUEUED  # the bulk: one message

    records(api).finalize(handle.id, TaskState.SUCCEEDED, result=SUCCESS)
    records(api).finalize(bulk[0].id, TaskState.FAILED, error={"type": "EngineError", "message": "decoder blew up"})
    result = handle.result(timeout=1)
    assert isinstance(result, ClassifyResult) and result.label == "NEGATIVE"
    with pytest.raises(TaskFailed) as caught:
        bulk[0].result(timeout=1)
    assert caught.value.error.type == "EngineError" and caught.value.error.message == "decoder blew up"
    assert bulk[1].cancel().state is TaskState.CANCELLED


def test_http_client_errors(api: TestClient, r: redis.Redis) -> None:
    client = HTTPClient("http://testserver", KEY, http=api)
    with pytest.raises(ValidationError, match="text must not be empty"):
        client.classify("  ")  # checked locally, nothing sent
    with pytest.raises(ValidationError, match="text is not valid Unicode: a lone surrogate"):
        client.classify("a\ud800")
    with pytest.raises(ValidationError, match="sampling needs at least 0.01"):
        client.translate("Hi", generation={"do_sample": True, "temperature": 1e-300})
    with pytest.raises(APIError) as too_long:
        client.classify("x" * 51)  # the server's limit
    assert too_long.value.status_code == 422 and "the limit is 50" in too_long.value.message
    with pytest.raises(APIError) as unknown:
        client.status("nope")
    assert (unknown.value.status_code, unknown.value.type) == (404, "TaskNotFound")
    assert r.dbsize() == 0

    with pytest.raises(APIError) as denied:
        HTTPClient("http://testserver", "wrong", http=api).classify("fine")
    assert denied.value.status_code == 401 and "invalid API key" in denied.value.message


# -- waiting and streaming over HTTP ---------------------------------------------------------------------


def submit_classify(api: TestClient, text: str = "hi") -> str:
    response = api.post("/v1/classify", json={"text": text}, headers=AUTH)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def finish_later(api: TestClient, task_id: str, after_s: float = 0.3) -> threading.Timer:
    """What a worker does, `after_s` from now: the final state, written once and announced."""
    timer = threading.Timer(after_s, lambda: records(api).finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS))
    timer.start()
    return timer


def test_long_poll_answers_when_the_task_finishes(api: TestClient) -> None:
    task_id = submit_classify(api)
    finish_later(api, task_id)
    started = time.monotonic()
    status = api.get(f"/v1/tasks/{task_id}", params={"wait": 20}, headers=AUTH).json()
    assert status["state"] == "succeeded" and status["result"]["label"] == "NEGATIVE"
    assert time.monotonic() - started < 10  # woken by the announcement, not by the 20 s wait


def test_long_poll_times_out_with_the_current_state(api: TestClient) -> None:
    task_id = submit_classify(api)
    response = api.get(f"/v1/tasks/{task_id}", params={"wait": 0.3}, headers=AUTH)
    assert response.status_code == 200 and response.json()["state"] == "queued"
    assert api.get(f"/v1/tasks/{task_id}", params={"wait": -1}, headers=AUTH).status_code == 422
    assert api.get("/v1/tasks/no-such-task", params={"wait": 1}, headers=AUTH).status_code == 404
    assert api.get(f"/v1/tasks/{task_id}", params={"wait": 1}).status_code == 401


def test_batch_status_in_order_with_unknown_ids_and_limits(api: TestClient) -> None:
    ids = [submit_classify(api, f"t{i}") for i in range(3)]
    records(api).finalize(ids[1], TaskState.FAILED, error={"type": "EngineError", "message": "boom"})
    response = api.post("/v1/statuses", json={"ids": ids}, headers=AUTH)
    assert [t["state"] for t in response.json()["tasks"]] == ["queued", "failed", "queued"]
    assert [t["id"] for t in response.json()["tasks"]] == ids
    unknown = api.post("/v1/statuses", json={"ids": [ids[0], "nope"]}, headers=AUTH)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]
    assert api.post("/v1/statuses", json={"ids": ids + ["x"]}, headers=AUTH).status_code == 422  # max_bulk 3
    assert api.post("/v1/statuses", json={"ids": []}, headers=AUTH).status_code == 422
    assert api.post("/v1/statuses", json={"ids": ids}).status_code == 401


def test_batch_status_waits_for_all_or_any(api: TestClient) -> None:
    ids = [submit_classify(api, f"t{i}") for i in range(2)]
    finish_later(api, ids[0], 0.2)
    any_done = api.post("/v1/statuses", json={"ids": ids, "wait": 20, "until": "any"}, headers=AUTH).json()
    assert [t["state"] for t in any_done["tasks"]] == ["succeeded", "queued"]
    finish_later(api, ids[1], 0.2)
    all_done = api.post("/v1/statuses", json={"ids": ids, "wait": 20}, headers=AUTH).json()
    assert [t["state"] for t in all_done["tasks"]] == ["succeeded", "succeeded"]
    timed_out = api.post("/v1/statuses", json={"ids": [submit_classify(api)], "wait": 0.2}, headers=AUTH)
    assert timed_out.json()["tasks"][0]["state"] == "queued"


def pubsub_clients(r: redis.Redis) -> int:
    return len(r.client_list(_type="pubsub"))


def _until(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_long_polls_share_one_redis_subscription(api: TestClient, r: redis.Redis) -> None:
    ids = [submit_classify(api, f"t{i}") for i in range(3)]  # max_bulk 3: batch waits of 3 ids
    singles = [submit_classify(api, f"s{i}") for i in range(12)]
    before = pubsub_clients(r)
    answers: dict[str, Any] = {}

    def long_poll(task_id: str) -> None:
        answers[task_id] = api.get(f"/v1/tasks/{task_id}", params={"wait": 30}, headers=AUTH).json()

    def batch_wait(name: str, until: str) -> None:
        answers[name] = api.post("/v1/statuses", json={"ids": ids, "wait": 30, "until": until}, headers=AUTH).json()

    threads = [threading.Thread(target=long_poll, args=(t,)) for t in singles + ids[:1]]
    threads += [threading.Thread(target=batch_wait, args=("all", "all")),
                threading.Thread(target=batch_wait, args=("any", "any"))]
    for thread in threads:
        thread.start()
    notices = api.app.state.notices  # type: ignore[attr-defined]
    _until(lambda: notices.channels == len(singles) + len(ids))  # every id waited on, each subscribed once
    assert pubsub_clients(r) == before + 1  # one connection for all 15 waiting requests (16 channels: 3 shared)
    for task_id in singles + ids:
        records(api).finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)
    for thread in threads:
        thread.join(timeout=20)
    assert all(answers[t]["state"] == "succeeded" for t in singles + ids[:1])
    assert [t["state"] for t in answers["all"]["tasks"]] == ["succeeded"] * 3
    assert "succeeded" in [t["state"] for t in answers["any"]["tasks"]]
    _until(lambda: notices.channels == 0)  # nobody waits: every channel unsubscribed
    assert not any(n for _, n in r.pubsub_numsub(*[f"pagedq:done:{t}" for t in singles + ids]))


def test_a_long_poll_survives_the_loss_of_the_shared_subscription(api: TestClient, r: redis.Redis) -> None:
    first, second = submit_classify(api, "a"), submit_classify(api, "b")
    answers: dict[str, Any] = {}

    def long_poll(task_id: str) -> None:
        answers[task_id] = api.get(f"/v1/tasks/{task_id}", params={"wait": 30}, headers=AUTH).json()

    threads = [threading.Thread(target=long_poll, args=(t,)) for t in (first, second)]
    for thread in threads:
        thread.start()
    notices = api.app.state.notices  # type: ignore[attr-defined]
    _until(lambda: notices.channels == 2)
    assert r.client_kill_filter(_type="pubsub") >= 1  # what a Redis restart or a proxy does to the connection
    started = time.monotonic()
    records(api).finalize(first, TaskState.SUCCEEDED, result=SUCCESS)  # maybe lost: published while it is down
    threads[0].join(timeout=20)
    assert answers[first]["state"] == "succeeded"  # the notice, or the periodic read that covers a lost one
    _until(lambda: sum(n for _, n in r.pubsub_numsub(f"pagedq:done:{second}")) == 1)  # re-subscribed
    records(api).finalize(second, TaskState.SUCCEEDED, result=SUCCESS)
    threads[1].join(timeout=20)
    assert answers[second]["state"] == "succeeded"
    assert time.monotonic() - started < 10  # well inside the 30 s wait


def test_http_client_waits_by_long_polling(api: TestClient) -> None:
    client = HTTPClient("http://testserver", KEY, http=api)
    ids = [submit_classify(api, f"t{i}") for i in range(3)]
    for i, task_id in enumerate(ids):
        finish_later(api, task_id, 0.1 * (i + 1))
    progress: list[tuple[int, int]] = []
    statuses = client.wait_all(ids, timeout=20, on_progress=lambda done, total: progress.append((done, total)))
    assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 3
    assert progress[0] == (0, 3) and progress[-1] == (3, 3)
    assert client.statuses(ids) == statuses
    late = submit_classify(api)
    with pytest.raises(TimeoutError):
        client.wait(late, timeout=0.3)
    finish_later(api, late, 0.1)
    assert client.wait(late, timeout=20).state is TaskState.SUCCEEDED


def test_stream_of_a_task_that_did_not_stream_sends_its_text_then_the_status(api: TestClient) -> None:
    response = api.post("/v1/translate", json={"text": "Hello", "source_lang": "en", "target_lang": "de"},
                        headers=AUTH)
    task_id = response.json()["id"]
    result = {"type": "translate", "model": "en-de", "translation": "Hallo", "finish_reason": "stop"}
    threading.Timer(0.3, lambda: records(api).finalize(task_id, TaskState.SUCCEEDED, result=result)).start()
    client = HTTPClient("http://testserver", KEY, http=api)
    events = list(client.stream(task_id, timeout=30))
    assert [(e.event, e.text) for e in events[:-1]] == [("token", "Hallo")]
    assert events[-1].event == "status" and events[-1].status is not None
    assert events[-1].status.state is TaskState.SUCCEEDED


def test_stream_replays_the_redis_stream_and_resumes_after_last_event_id(api: TestClient, r: redis.Redis) -> None:
    task_id = submit_classify(api)
    key = stream_key(task_id)
    first = r.xadd(key, {"text": "Ada "})
    r.xadd(key, {"reset": "1"})
    r.xadd(key, {"text": "Ada wrote"})
    r.xadd(key, {"end": "succeeded"})
    records(api).finalize(task_id, TaskState.SUCCEEDED, result=SUCCESS)
    assert api.get(f"/v1/tasks/{task_id}/stream").status_code == 401
    client = HTTPClient("http://testserver", KEY, http=api)
    events = list(client.stream(task_id, timeout=30))
    assert [(e.event, e.text) for e in events] == [("token", "Ada "), ("reset", ""), ("token", "Ada wrote"),
                                                   ("status", "")]
    resumed = api.get(f"/v1/tasks/{task_id}/stream", headers={**AUTH, "Last-Event-ID": first})
    assert [e.event for e in parse_sse(resumed.text.splitlines())] == ["reset", "token", "status"]
    assert api.get("/v1/tasks/nope/stream", headers=AUTH).status_code == 404
