"""End to end with real parts: a private redis-server, real Celery worker processes (threads pool) running
the engine over tiny random-weight models loaded from disk, the real HTTP API (uvicorn) and Flower.
Results are compared with what transformers computes directly on the same model and input."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from pagedq.shared.models import TaskType
from pagedq.shared.registry import Registry
from scripts.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The default visibility timeout (hours): a killed worker's tasks come back within seconds because its
    # lease lapses (worker/lease.py, worker/reconciler.py), not because Redis redelivers them.
    env = {"PAGEDQ_LIMITS__MAX_TIMEOUT_S": "4"}
    with Stack(registry_path=demo_models, log_dir=tmp_path_factory.mktemp("logs"), worker_concurrency=8,
               extra_env=env) as s:
        yield s


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers={"X-API-Key": stack.api_key}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def registry(demo_models: Path) -> Registry:
    return Registry.load(demo_models)


def submit(http: httpx.Client, kind: str, body: dict[str, Any]) -> str:
    r = http.post(f"/v1/{kind}", json=body)
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    assert r.headers["location"].endswith(f"/v1/tasks/{task_id}")
    return task_id


def wait(http: httpx.Client, task_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = http.get(f"/v1/tasks/{task_id}").json()
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish in {timeout_s}s: {status}")


def queued_messages(stack: Stack) -> int:
    client = redis.Redis.from_url(stack.redis_url or "")
    return sum(client.llen(k) for k in client.scan_iter("pagedq.*"))


def test_classify_matches_the_transformers_pipeline(http: httpx.Client, registry: Registry) -> None:
    from transformers import pipeline

    texts = ["a good film", "slow service and cold food", "it was fine, nothing special at all"]
    ids = [submit(http, "classify", {"text": t, "top_k": None}) for t in texts]
    spec = registry.models[registry.defaults["classify"]]
    reference = pipeline("text-classification", model=registry.resolve_source(spec), top_k=None)
    for task_id, text in zip(ids, texts, strict=True):
        status = wait(http, task_id)
        assert status["state"] == "succeeded", status
        got = {s["label"]: s["score"] for s in status["result"]["scores"]}
        want = {s["label"]: s["score"] for s in reference([text])[0]}
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < 1e-4 for k in want)
        assert status["result"]["label"] == max(want, key=want.get)


def test_translate_matches_generate(http: httpx.Client, registry: Registry) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    spec = registry.models[registry.defaults["translate"]]
    source = registry.resolve_source(spec)
    tok, model = AutoTokenizer.from_pretrained(source), AutoModelForSeq2SeqLM.from_pretrained(source).eval()
    texts = ["hello world", "the weather is nice today and we go out"]
    ids = [submit(http, "translate", {"text": t, "source_lang": "en", "target_lang": "de",
                                      "generation": {"max_new_tokens": 12}}) for t in texts]
    for task_id, text in zip(ids, texts, strict=True):
        status = wait(http, task_id)
        assert status["state"] == "succeeded", status
        out = model.generate(**tok(text, return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert status["result"]["translation"] == tok.decode(out[0], skip_special_tokens=True)


def test_extractive_qa_matches_the_pipeline(http: httpx.Client, demo_models: Path, registry: Registry) -> None:
    """Reference: transformers' v4 question-answering pipeline (removed in v5), ported in the executor tests."""
    from executor_support import load_demo, reference_qa

    context = "The Eiffel Tower in Paris was completed in 1889 by the company of Gustave Eiffel. " * 12
    task_id = submit(http, "qa", {"question": "When was it completed?", "context": context})
    status = wait(http, task_id)
    assert status["state"] == "succeeded", status
    lm = load_demo(demo_models, registry.defaults["qa"])
    want = reference_qa(lm, "When was it completed?", context, max_answer_len=30, impossible=False)
    got = status["result"]
    assert (got["answer"], got["start"], got["end"]) == (want["answer"], want["start"], want["end"])
    assert abs(got["score"] - want["score"]) < 1e-4
    assert context[got["start"]:got["end"]] == got["answer"]


def test_generative_qa_runs_through_the_engine(http: httpx.Client, registry: Registry) -> None:
    spec = next(s for s in registry.models.values() if s.mode == "generative")
    task_id = submit(http, "qa", {"question": "who?", "context": "Ada wrote the first program.", "mode": "generative",
                                  "generation": {"max_new_tokens": 8}})
    status = wait(http, task_id)
    assert status["state"] == "succeeded", status
    assert status["model"] == spec.name and status["result"]["mode"] == "generative"
    assert 1 <= status["result"]["output_tokens"] <= 8


def test_mixed_traffic_interleaved_in_one_worker(http: httpx.Client, demo_models: Path, registry: Registry) -> None:
    """Classification, extractive QA, translation and generative QA submitted interleaved to the one worker:
    the engine serves them side by side (their run times overlap) and every result equals transformers'."""
    from executor_support import load_demo, pipeline_scores, reference_qa
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    texts = [f"review {i}: " + "the food was good but the service " * (i % 4 + 1) + "slow" for i in range(8)]
    sentences = [f"we go out {'and walk ' * i}today" for i in range(6)]
    contexts = [f"Ada Lovelace wrote the first program in {1840 + i}. " * (2 + i) for i in range(4)]
    jobs: list[tuple[str, str, Any]] = []  # (kind, task id, input)
    for i in range(8):  # interleaved: one of each kind in turn
        jobs.append(("classify", submit(http, "classify", {"text": texts[i], "top_k": None}), texts[i]))
        if i < len(sentences):
            body = {"text": sentences[i], "source_lang": "en", "target_lang": "de",
                    "generation": {"max_new_tokens": 10}}  # fmt: skip
            jobs.append(("translate", submit(http, "translate", body), sentences[i]))
        if i < len(contexts):
            jobs.append(("qa", submit(http, "qa", {"question": "When was it written?", "context": contexts[i]}),
                         contexts[i]))  # fmt: skip
        if i < 2:
            body = {"question": "who?", "context": contexts[i], "mode": "generative",
                    "generation": {"max_new_tokens": 6}}  # fmt: skip
            jobs.append(("generative", submit(http, "qa", body), None))
    statuses = [wait(http, task_id) for _, task_id, _ in jobs]
    failed = [s for s in statuses if s["state"] != "succeeded"]
    assert not failed, failed

    classifier = load_demo(demo_models, registry.defaults["classify"])
    qa_model = load_demo(demo_models, registry.defaults["qa"])
    source = registry.resolve_source(registry.models[registry.defaults["translate"]])
    tok, translator = AutoTokenizer.from_pretrained(source), AutoModelForSeq2SeqLM.from_pretrained(source).eval()
    for (kind, _, given), status in zip(jobs, statuses, strict=True):
        result = status["result"]
        if kind == "classify":
            want = pipeline_scores(classifier, given)
            assert [s["label"] for s in result["scores"]] == [w["label"] for w in want]
            assert [s["score"] for s in result["scores"]] == pytest.approx([w["score"] for w in want], abs=1e-4)
        elif kind == "translate":
            out = translator.generate(**tok(given, return_tensors="pt"), max_new_tokens=10, do_sample=False)
            assert result["translation"] == tok.decode(out[0], skip_special_tokens=True)
        elif kind == "qa":
            want = reference_qa(qa_model, "When was it written?", given, max_answer_len=30, impossible=False)
            assert (result["answer"], result["start"], result["end"]) == (want["answer"], want["start"], want["end"])
        else:
            assert result["mode"] == "generative" and 1 <= result["output_tokens"] <= 6

    def window(status: dict[str, Any]) -> tuple[datetime, datetime]:
        return datetime.fromisoformat(status["started_at"]), datetime.fromisoformat(status["finished_at"])

    overlapping_kinds = {
        frozenset((ka, kb))
        for (ka, _, _), sa in zip(jobs, statuses, strict=True)
        for (kb, _, _), sb in zip(jobs, statuses, strict=True)
        if ka != kb and window(sa)[0] < window(sb)[1] and window(sb)[0] < window(sa)[1]
    }
    assert overlapping_kinds, "the task types ran one after another, not interleaved"


def test_unknown_id_is_404(http: httpx.Client) -> None:
    r = http.get("/v1/tasks/00000000-0000-4000-8000-000000000000")
    assert r.status_code == 404 and "message" in r.text


@pytest.mark.parametrize(("kind", "body", "status"), [
    ("classify", {"text": ""}, 422),
    ("classify", {"text": "x" * 10_001}, 422),
    ("classify", {"text": 5}, 422),
    ("classify", {"text": "hi", "model": "no-such-model"}, 404),
    ("classify", {"text": "hi", "extra": 1}, 422),
    ("translate", {"text": "hi", "source_lang": "en", "target_lang": "xx"}, 422),
])
def test_bad_input_is_rejected_and_nothing_is_enqueued(stack: Stack, http: httpx.Client, kind: str,
                                                       body: dict[str, Any], status: int) -> None:
    before = queued_messages(stack)
    r = http.post(f"/v1/{kind}", json=body)
    assert r.status_code == status, r.text
    assert r.json()  # a JSON body with a message
    assert queued_messages(stack) == before


def test_invalid_json_and_missing_key_are_rejected(stack: Stack) -> None:
    r = httpx.post(f"{stack.api_url}/v1/classify", content="{nope", headers={"X-API-Key": stack.api_key,
                                                                               "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
    r = httpx.post(f"{stack.api_url}/v1/classify", json={"text": "hi"})
    assert r.status_code == 401 and "key" in r.text.lower()


def test_cancel_stops_a_task(http: httpx.Client) -> None:
    task_id = submit(http, "qa", {"question": "why?", "context": "A long story. " * 20, "mode": "generative",
                                  "generation": {"max_new_tokens": 512}})
    r = http.delete(f"/v1/tasks/{task_id}")
    assert r.status_code in (200, 202), r.text
    status = wait(http, task_id)
    assert status["state"] == "cancelled", status
    assert http.delete(f"/v1/tasks/{task_id}").status_code == 409


def test_expired_task_ends_expired(http: httpx.Client) -> None:
    task_id = submit(http, "translate", {"text": "hello " * 50, "timeout_s": 0.001,
                                         "generation": {"max_new_tokens": 64}})
    status = wait(http, task_id)
    assert status["state"] == "expired", status
    assert status["error"]["type"] == "DeadlineExceeded"


def test_the_worker_survives_bad_messages_and_keeps_serving(http: httpx.Client, stack: Stack) -> None:
    from pagedq.shared.celery_config import make_celery
    from pagedq.shared.models import TaskType
    from pagedq.shared.records import TaskRecords

    app = make_celery(stack.settings())
    records = TaskRecords.from_url(stack.redis_url or "", 600)
    broken = "bad-message-" + str(time.time_ns())
    records.create(broken, TaskType.CLASSIFY, "default", 0, None)  # a record, but a body the producer refuses
    app.send_task("pagedq.classify", args=[{"request": {"text": ""}}], task_id=broken, queue="pagedq.classify")
    app.send_task("pagedq.classify.batch", args=[{"items": "not a list of items"}], queue="pagedq.classify")
    status = wait(http, broken)
    assert status["state"] == "failed" and status["error"]["type"] == "InvalidRequest", status
    task_id = submit(http, "classify", {"text": "still alive"})
    assert wait(http, task_id)["state"] == "succeeded"
    app.close()


def test_readyz_and_metrics(stack: Stack) -> None:
    assert httpx.get(f"{stack.api_url}/healthz").status_code == 200
    assert httpx.get(f"{stack.api_url}/readyz").status_code == 200
    metrics = httpx.get(stack.metrics_url).text
    assert 'pagedq_tasks_total{model="demo-classifier",outcome="succeeded",task="classify"}' in metrics
    # the bad message of the test above: the request's fault, counted apart from failures of the service
    assert 'outcome="user_error",task="classify"}' in metrics
    assert 'task="classify",type="InvalidRequest"}' in metrics
    assert 'pagedq_e2e_request_latency_seconds_bucket{le="0.01",model="demo-classifier",task="classify"}' in metrics
    assert "pagedq_num_requests_waiting" in metrics


def test_a_client_without_a_registry_file_validates_against_the_workers(stack: Stack, registry: Registry) -> None:
    """`Client(url)` as the README shows it (no registry file): the worker's published registry rejects an
    unknown model and an unserved language pair at submission, before anything is queued."""
    from pagedq.producer.client import Client
    from pagedq.shared.errors import ModelNotFound, UnsupportedLanguagePair
    from pagedq.shared.settings import Settings

    with Client(settings=Settings(redis_url=stack.redis_url or "", registry_path=None)) as client:
        before = queued_messages(stack)
        with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'"):
            client.classify("hi", model="no-such-model")
        with pytest.raises(UnsupportedLanguagePair):
            client.translate("hi", source_lang="en", target_lang="xx")
        assert queued_messages(stack) == before
        status = client.classify("hi").wait(60)
        assert status.state.value == "succeeded" and status.model == registry.defaults[TaskType.CLASSIFY]


def test_metrics_cover_every_executor_kind_by_model(stack: Stack, registry: Registry) -> None:
    """After the mixed traffic above (classification, extractive QA, translation, generative QA), every model
    that ran has its task count, prompt tokens and engine steps under its own `model` label, and the
    generating ones their generated tokens (the paged causal LM included)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(stack.metrics_url).text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is not None and sample.labels.get("outcome", "succeeded") == "succeeded":
                samples[(sample.name, model)] = samples.get((sample.name, model), 0.0) + sample.value
    generative = next(s.name for s in registry.models.values() if s.mode == "generative")
    ran = {registry.defaults[TaskType.CLASSIFY]: False, registry.defaults[TaskType.QA]: False,
           registry.defaults[TaskType.TRANSLATE]: True, generative: True}  # model -> generates tokens
    for model, generates in ran.items():
        assert samples.get(("pagedq_tasks_total", model), 0) > 0, model
        assert samples.get(("pagedq_prompt_tokens_total", model), 0) > 0, model
        assert samples.get(("pagedq_engine_steps_total", model), 0) > 0, model
        assert (samples.get(("pagedq_generation_tokens_total", model), 0) > 0) is generates, model
    for model in registry.models:  # each model's own engine thread, running, never restarted here
        assert samples.get(("pagedq_engine_thread_alive", model)) == 1.0, model
        assert samples.get(("pagedq_engine_thread_restarts_total", model)) == 0.0, model
    for model in (registry.defaults[TaskType.TRANSLATE], generative):  # both paged engines note first tokens
        assert samples.get(("pagedq_time_to_first_token_seconds_count", model), 0) > 0, model
        assert samples.get(("pagedq_time_per_output_token_seconds_count", model), 0) > 0, model


def test_a_redelivered_task_is_not_run_twice(stack: Stack, http: httpx.Client) -> None:
    from pagedq.shared.celery_config import make_celery

    task_id = submit(http, "classify", {"text": "first body"})
    first = wait(http, task_id)["result"]
    app = make_celery(stack.settings())
    app.send_task("pagedq.classify", args=[{"request": {"text": "another body, same id " * 20}}],
                  task_id=task_id, queue="pagedq.classify")
    deadline = time.monotonic() + 30
    while queued_messages(stack) or any((app.control.inspect(timeout=1).active() or {}).values()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert wait(http, task_id)["result"] == first
    app.close()


def test_flower_lists_the_worker(stack: Stack) -> None:
    user, password = stack.flower_auth.split(":")
    assert httpx.get(f"{stack.flower_url}/api/workers").status_code == 401
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = httpx.get(f"{stack.flower_url}/api/workers", auth=(user, password), params={"refresh": "true"},
                            timeout=15).json()
        if any(name.startswith("worker") for name in workers):
            name, info = next((k, v) for k, v in workers.items() if k.startswith("worker"))
            stats = info.get("stats", {})
            assert "pagedq" in stats, info.keys()  # the raw engine stats, for tools
            # and readable lines on the worker page's "Other" tab
            assert stats["pagedq engine"].startswith("running (5 engine threads); "), stats["pagedq engine"]
            assert stats["pagedq"]["engine"]["lanes"] == 5  # one per demo model
            assert stats["pagedq model demo-classifier"].startswith("loaded: "), stats
            page = httpx.get(f"{stack.flower_url}/worker/{name}", auth=(user, password), timeout=15).text
            assert "pagedq model demo-classifier" in page and "running (5 engine threads); " in page
            return
        time.sleep(1)
    raise AssertionError(f"Flower does not list the worker: {workers}")


def test_nothing_is_lost_when_a_worker_is_killed(stack: Stack, http: httpx.Client) -> None:
    """50 tasks in flight, SIGKILL the worker mid-run, start a new one: every task finishes."""
    body = {"text": "a sentence to translate " * 6, "generation": {"max_new_tokens": 48}}
    ids = [submit(http, "translate", body) for _ in range(50)]
    records = redis.Redis.from_url(stack.redis_url or "", decode_responses=True)
    deadline = time.monotonic() + 60
    while not any(records.hget(f"pagedq:task:{i}", "started_at") for i in ids):
        assert time.monotonic() < deadline, "no task started"
        time.sleep(0.02)
    stack.kill(f"worker{stack.worker_count}")
    unfinished = [i for i in ids if http.get(f"/v1/tasks/{i}").json()["state"] in ("queued", "running")]
    assert unfinished, "every task finished before the kill: the test proved nothing"
    stack.start_worker()
    stack.wait_worker()
    statuses = [wait(http, i, timeout_s=120) for i in ids]
    assert [s["state"] for s in statuses] == ["succeeded"] * 50


def test_generated_text_streams_over_sse_and_equals_the_result(stack: Stack) -> None:
    """Generative QA on the demo causal LM with `stream`: the Server-Sent Events carry the text while it is
    generated, in several pieces, and put together they are exactly the final answer."""
    from pagedq.producer.client import HTTPClient

    with HTTPClient(stack.api_url, stack.api_key) as api:
        handle = api.qa("who wrote it?", "Ada wrote the first program.", mode="generative",
                        generation={"max_new_tokens": 48, "stream": True})
        events = list(api.stream(handle.id, timeout=60))
    tokens = [e.text for e in events if e.event == "token"]
    assert events[-1].event == "status" and events[-1].status is not None
    final = events[-1].status
    assert final.state.value == "succeeded", final
    assert "reset" not in [e.event for e in events]
    assert "".join(tokens) == final.result.answer  # type: ignore[union-attr]
    assert len(tokens) >= 2, tokens  # streamed while generated, not in one piece at the end
