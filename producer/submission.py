"""One submission: a validated request with its id, model and deadline, and the message the worker gets.

The messages are the wire contract with the worker (`pagedq.worker.tasks`). One task, task name `pagedq.<type>`:
`{"request": <request JSON>, "model": <registry name>, "deadline": <epoch s>, "submitted_at": <epoch s>}`, the
request without the fields at their defaults (the worker's validation fills them in).
Many tasks of a bulk submission, task name `pagedq.<type>.batch`, K items per message:
`{"items": [{"id": <task id>, "request": ..., "model": ..., "deadline": ..., "submitted_at": ...}, ...]}`.
Every item keeps its own id, record, status, deadline, priority and cancel; only the transport is shared.

A bulk's messages grow: the first holds `FIRST_MESSAGE_ITEMS` (one engine step's worth at the default request
cap, so a worker's engine starts on it while the rest is recorded), each next one twice the last, up to
`bulk_message_items`; and a message holds at most `MESSAGE_TEXT_CHARS` characters of request text (an item
longer than that travels alone). Few large messages cost the worker less per item (a claim, a hand-off to the
engine, Celery's consumer and events are per message); small first ones start the engine sooner and spread a
small bulk over several workers as before.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pagedq.shared.models import SubmitResponse, TaskRequest, TaskType

#: items in a bulk's first message (see the module docstring)
FIRST_MESSAGE_ITEMS = 64
#: characters of request text in one message, at most: 512 QA items with 100,000-character contexts would
#: make a message of ~50 MB
MESSAGE_TEXT_CHARS = 1_000_000


def task_location(task_id: str) -> str:
    """Where the HTTP API serves a task's status."""
    return f"/v1/tasks/{task_id}"


@dataclass(frozen=True)
class Submission:
    """One validated request, ready to be recorded and sent."""

    id: str
    task_type: TaskType
    request: TaskRequest
    model: str
    submitted_at: float  # epoch seconds
    deadline: float  # epoch seconds

    @cached_property
    def message(self) -> dict[str, Any]:
        return {
            "request": self.request.model_dump(mode="json", exclude_defaults=True),  # the worker fills them in
            "model": self.model,
            "deadline": self.deadline,
            "submitted_at": self.submitted_at,
        }

    @property
    def text_chars(self) -> int:
        """Characters of the request's text fields (text, question, context, prompt): its size in a message."""
        return sum(len(value) for value in self.request.__dict__.values() if isinstance(value, str))

    @property
    def summary(self) -> str:
        return f"<{self.task_type.value} request for model {self.model!r}, priority {self.request.priority}>"

    @property
    def response(self) -> SubmitResponse:
        # validated: 3x faster than model_construct, which copies each default in Python (~9 us)
        return SubmitResponse(id=self.id, type=self.task_type, location=task_location(self.id))


@dataclass(frozen=True)
class BatchMessage:
    """Several submissions of one bulk, one priority, carried by one Celery message."""

    id: str  # the Celery task id of the message; each item keeps its own task id
    task_type: TaskType
    priority: int
    items: Sequence[Submission]

    @property
    def body(self) -> dict[str, Any]:
        return {"items": [{"id": s.id, **s.message} for s in self.items]}

    @property
    def summary(self) -> str:
        models = sorted({s.model for s in self.items})
        return f"<{len(self.items)} {self.task_type.value} requests for {', '.join(map(repr, models))}, " \
               f"priority {self.priority}>"


def batch_messages(submissions: Sequence[Submission], items_per_message: int) -> list[BatchMessage]:
    """Group a bulk into messages of one priority, in submission order within each priority (the queue orders
    messages by priority, so items never jump their priority): `FIRST_MESSAGE_ITEMS` items first, each next
    message twice the last, up to `items_per_message`, and at most `MESSAGE_TEXT_CHARS` characters of text."""
    by_priority: dict[int, list[Submission]] = {}
    for submission in submissions:
        by_priority.setdefault(submission.request.priority, []).append(submission)
    return [BatchMessage(f"batch-{uuid.uuid4()}", chunk[0].task_type, priority, chunk)
            for priority, items in by_priority.items() for chunk in _growing_chunks(items, items_per_message)]


def _growing_chunks(items: Sequence[Submission], most: int) -> Iterator[list[Submission]]:
    """`items` in order, in chunks of `FIRST_MESSAGE_ITEMS`, then twice the last, up to `most` items and at most
    `MESSAGE_TEXT_CHARS` characters of text (an item longer than that alone)."""
    size = min(most, FIRST_MESSAGE_ITEMS)
    chunk: list[Submission] = []
    chars = 0
    for submission in items:
        length = submission.text_chars
        if chunk and (len(chunk) >= size or chars + length > MESSAGE_TEXT_CHARS):
            yield chunk
            chunk, chars, size = [], 0, min(size * 2, most)
        chunk.append(submission)
        chars += length
    if chunk:
        yield chunk
