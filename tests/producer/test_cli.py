"""The `pagedq` CLI (typer's CliRunner) against a real private Redis.

`--wait` tests run a stand-in worker thread that pops the real messages off the queue and finalizes
the real task records, as a worker does; `--api` tests run the real API under uvicorn in a thread.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from typer.testing import CliRunner

from pagedq.producer.api import create_app
from pagedq.producer.cli import app
from pagedq.shared.celery_config import PRIORITY_SEP as SEP
from pagedq.shared.models import REQUEST_MODELS, TaskState, TaskType
from pagedq.shared.records import KEY_PREFIX, TaskRecords
from pagedq.shared.redis_server import free_port
from pagedq.shared.settings import Settings, get_settings

QUEUES = [f"pagedq.{t}{p}" for t in ("classify", "translate", "qa") for p in ("", SEP + "3", SEP + "6", SEP + "9")]
API_KEY = "cli-key"


def message_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The tasks a queued message carries, each with its "id": one, or the items of a bulk batch message."""
    [body], _, _ = json.loads(base64.b64decode(message["body"]))
    return body["items"] if "items" in body else [{"id": message["headers"]["id"], **body}]


def sent_requests(r: redis.Redis) -> list[dict[str, Any]]:
    """The `request` of every message waiting on any queue, oldest first, as the worker reads it (messages
    leave out the fields at their defaults)."""
    found = []
    for queue in QUEUES:
        model = REQUEST_MODELS[TaskType(queue.split(SEP)[0].removeprefix("pagedq."))]
        for raw in reversed(r.lrange(queue, 0, -1)):
            found += [model.model_validate(item["request"]).model_dump(mode="json")
                      for item in message_items(json.loads(raw))]
    return found


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines()]


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture()
def cli(redis_url: str) -> Any:
    """`cli(*args, input=None)`: run pagedq against the test Redis."""
    runner = CliRunner()
    env = {"PAGEDQ_REDIS_URL": redis_url, "PAGEDQ_API_URL": None, "PAGEDQ_API_KEY": None}
    return lambda *args, input=None: runner.invoke(app, list(args), input=input, env=env)


class StandInWorker(threading.Thread):
    """Takes messages off the classify queues like a worker; text "fail" fails, anything else succeeds."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(daemon=True)
        self.redis = redis.Redis.from_url(redis_url)
        self.records = TaskRecords.from_url(redis_url, 3600)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            popped = self.redis.brpop([q for q in QUEUES if q.startswith("pagedq.classify")], timeout=0.1)
            if popped is not None:
                self._finish(json.loads(popped[1]))

    def _finish(self, message: dict[str, Any]) -> None:
        for item in message_items(message):
            self._finish_item(item["id"], item)

    def _finish_item(self, task_id: str, body: dict[str, Any]) -> None:
        text = body["request"]["text"]
        if text == "fail":
            self.records.finalize(task_id, TaskState.FAILED,
                                  error={"type": "EngineError", "message": "the model fell over"})
        else:
            result = {"type": "classify", "model": body["model"], "label": text.upper(), "score": 1.0, "scores": []}
            self.records.finalize(task_id, TaskState.SUCCEEDED, result=result)


@pytest.fixture()
def worker(redis_url: str) -> Iterator[StandInWorker]:
    thread = StandInWorker(redis_url)
    thread.start()
    yield thread
    thread.stopped.set()
    thread.join(5)


@pytest.fixture()
def api_url(redis_url: str) -> Iterator[str]:
    """The real API served by uvicorn on a free port, in a thread of this process."""
    settings = Settings(redis_url=redis_url, registry_path=None, api_keys=[API_KEY])
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)


# -- submitting -----------------------------------------------------------------------------------------


def test_classify_one_text(cli: Any, r: redis.Redis) -> None:
    result = cli("classify", "I loved it", "--top-k", "2", "--priority", "-10", "--model", "sentiment")
    assert result.exit_code == 0, result.stderr
    [submitted] = lines(result.stdout)
    assert submitted["type"] == "classify" and submitted["state"] == "queued"
    assert r.hget(KEY_PREFIX + submitted["id"], "model") == "sentiment"
    [request] = sent_requests(r)
    assert (request["text"], request["top_k"], request["priority"]) == ("I loved it", 2, -10)


def test_classify_a_file_of_lines_is_one_bulk(cli: Any, r: redis.Redis, tmp_path: Path) -> None:
    texts = tmp_path / "reviews.txt"
    texts.write_text("great\n\nawful\nfine, I guess\nmeh\n")
    result = cli("classify", "--file", str(texts), "--timeout", "60")
    assert result.exit_code == 0, result.stderr
    submitted = lines(result.stdout)
    assert len(submitted) == 4 and all(r.exists(KEY_PREFIX + s["id"]) for s in submitted)
    assert [req["text"] for req in sent_requests(r)] == ["great", "awful", "fine, I guess", "meh"]
    assert all(req["timeout_s"] == 60 for req in sent_requests(r))
    assert "Submitting 4 classify tasks" in result.stderr and "4/4" in result.stderr


def test_translate_lines_from_stdin(cli: Any, r: redis.Redis) -> None:
    result = cli("translate", "-", "--source", "en", "--target", "de", input="Hello\nGood night\n")
    assert result.exit_code == 0, result.stderr
    assert len(lines(result.stdout)) == 2
    requests = sent_requests(r)
    assert [(q["text"], q["source_lang"], q["target_lang"]) for q in requests] == [
        ("Hello", "en", "de"),
        ("Good night", "en", "de"),
    ]


def test_a_bad_line_fails_the_whole_file_with_exit_2(cli: Any, r: redis.Redis, tmp_path: Path) -> None:
    limit = get_settings().limits.max_text_chars
    texts = tmp_path / "texts.txt"
    texts.write_text(f"fine\nalso fine\n{'x' * (limit + 1)}\n")
    result = cli("classify", "-f", str(texts))
    assert result.exit_code == 2
    assert f"line 3 of {texts}: text: text is {limit + 1} characters; the limit is {limit}" in result.stderr
    assert result.stdout == "" and r.dbsize() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify"], "no input"),
        (["classify", "a", "--file", "x.txt"], "not both"),
        (["classify", "--file", "/no/such/file"], "cannot read /no/such/file"),
        (["classify", "ok", "--timeout", "-1"], "timeout_s: Input should be greater than 0"),
        (["classify", "ok", "--priority", "500"], "priority: Input should be less than or equal to 100"),
        (["qa", "--question", "Who?"], "give --question and --context"),
        (["qa", "--question", "Who?", "--context", " "], "context: context must not be empty"),
        (["status", "no-such-id"], "no task with id 'no-such-id'"),
        (["cancel", "no-such-id"], "no task with id 'no-such-id'"),
    ],
)
def test_bad_input_exits_2_with_the_reason(cli: Any, r: redis.Redis, args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stdout == ""
    assert r.dbsize() == 0


def test_qa_single_and_jsonl(cli: Any, r: redis.Redis, tmp_path: Path) -> None:
    assert cli("qa", "-q", "Who wrote it?", "-c", "Ada wrote it.").exit_code == 0
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "When?", "context": "In 1843."}\n{"question": "Where?", "context": "London."}\n')
    result = cli("qa", "--file", str(questions), "--priority", "50")
    assert result.exit_code == 0, result.stderr
    assert len(lines(result.stdout)) == 2
    assert [(q["question"], q["priority"]) for q in sent_requests(r)] == [
        ("Who wrote it?", 0),
        ("When?", 50),
        ("Where?", 50),
    ]


def test_qa_jsonl_with_a_broken_line(cli: Any, r: redis.Redis, tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "When?", "context": "In 1843."}\n{"question": "Where?"\n')
    result = cli("qa", "--file", str(questions))
    assert result.exit_code == 2 and f"line 2 of {questions}: not valid JSON" in result.stderr
    assert r.dbsize() == 0


# -- waiting and results --------------------------------------------------------------------------------


def test_wait_prints_final_statuses(cli: Any, worker: StandInWorker) -> None:
    result = cli("classify", "good", "great", "--wait")
    assert result.exit_code == 0, result.stderr
    statuses = lines(result.stdout)
    assert [(s["state"], s["result"]["label"]) for s in statuses] == [("succeeded", "GOOD"), ("succeeded", "GREAT")]
    assert "Waiting for 2 results" in result.stderr


def test_wait_exits_1_when_a_task_fails(cli: Any, worker: StandInWorker) -> None:
    result = cli("classify", "good", "fail", "--wait")
    assert result.exit_code == 1
    good, failed = lines(result.stdout)
    assert good["state"] == "succeeded"
    assert failed["state"] == "failed"
    assert failed["error"] == {"type": "EngineError", "message": "the model fell over"}


def test_status_wait_and_cancel_commands(cli: Any, r: redis.Redis, worker: StandInWorker) -> None:
    [done] = lines(cli("classify", "hello").stdout)
    waited = cli("wait", done["id"], "--timeout", "5")
    assert waited.exit_code == 0 and lines(waited.stdout)[0]["state"] == "succeeded"
    status = cli("status", done["id"])
    assert status.exit_code == 0 and lines(status.stdout)[0]["result"]["label"] == "HELLO"
    refused = cli("cancel", done["id"])
    assert refused.exit_code == 2 and "already finished (succeeded)" in refused.stderr

    [failed] = lines(cli("classify", "fail", "--wait").stdout)
    assert cli("status", failed["id"]).exit_code == 1

    [queued] = lines(cli("translate", "Hello", "--target", "de").stdout)  # no translate worker here
    timed_out = cli("wait", queued["id"], "--timeout", "0.3")
    assert timed_out.exit_code == 1 and "not finished after 0.3 s" in timed_out.stderr
    cancelled = cli("cancel", queued["id"])
    assert cancelled.exit_code == 0 and lines(cancelled.stdout)[0]["state"] == "cancelled"
    assert r.hget(KEY_PREFIX + queued["id"], "cancel_requested") == "1"
    assert cli("status", queued["id"]).exit_code == 1


# -- through the HTTP API -------------------------------------------------------------------------------


def test_through_the_api(cli: Any, r: redis.Redis, api_url: str, tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\nthree\n")
    result = cli("classify", "--file", str(texts), "--api", api_url, "--api-key", API_KEY)
    assert result.exit_code == 0, result.stderr
    submitted = lines(result.stdout)
    assert len(submitted) == 3 and [q["text"] for q in sent_requests(r)] == ["one", "two", "three"]

    status = cli("status", submitted[0]["id"], "--api", api_url, "--api-key", API_KEY)
    assert status.exit_code == 0 and lines(status.stdout)[0]["state"] == "queued"

    denied = cli("classify", "four", "--api", api_url, "--api-key", "wrong")
    assert denied.exit_code == 2 and "invalid API key" in denied.stderr
    unreachable = cli("classify", "four", "--api", f"http://127.0.0.1:{free_port()}", "--api-key", API_KEY)
    assert unreachable.exit_code == 1 and "cannot reach the API" in unreachable.stderr
    assert len(sent_requests(r)) == 3


def test_help_lists_the_commands(cli: Any) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("classify", "translate", "qa", "status", "wait", "cancel"):
        assert command in result.stdout
