"""The worker's task Request (worker/tasks.py: DecodedRequest) hands the task thread the body Celery's message
handler already decoded, instead of the raw body the thread would decode a second time."""

from __future__ import annotations

import json
from typing import Any

from celery import Celery
from celery.app.trace import build_tracer
from kombu.message import Message

from pagedq.worker.tasks import DecodedRequest

BODY = [[{"items": [{"id": "a"}, {"id": "b"}]}], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                       "chord": None}]


def _app() -> tuple[Celery, Any]:
    app = Celery("decoded-request-test", set_as_current=False)

    @app.task(name="count_items", bind=True, Request=DecodedRequest)
    def count_items(self: Any, body: dict[str, Any]) -> int:
        return len(body["items"])

    return app, count_items


def _message() -> Message:
    return Message(body=json.dumps(BODY), content_type="application/json", content_encoding="utf-8",
                   headers={"id": "task-1", "task": "count_items", "lang": "py"})


def test_a_body_the_handler_decoded_reaches_the_task_decoded() -> None:
    app, task = _app()
    message = _message()
    assert message.payload == BODY  # what Celery's task message handler reads first (strategy.py)
    request = DecodedRequest(message, app=app, task=task, hostname="worker-1")
    assert request.content_type is None and request.body == BODY  # no second decode in the task thread
    tracer = build_tracer(task.name, task, app=app, eager=True)
    args, kwargs, _ = request.body
    assert tracer(request.id, args, kwargs, request.request_dict).retval == 2


def test_a_body_its_caller_decoded_is_kept_as_given() -> None:
    # Celery's handler converts a protocol 1 message itself and passes the result with decoded=True
    app, task = _app()
    given = [[{"items": [{"id": "c"}]}], {}, {}]
    request = DecodedRequest(_message(), app=app, task=task, hostname="worker-1", body=given, decoded=True)
    assert request.body is given and request.content_type is None
