"""The producer's core, shared by the Python client, the HTTP API and the CLI.

Submission, in this order, so that a bad request leaves no trace:

    validate (request models, limits) -> pick the model (registry) -> write the record -> send the message

The message (`pagedq.producer.submission`) is sent by task name to the task type's queue, with the request's
priority mapped onto kombu's 0..9. If sending fails, the records of the unsent tasks are removed again.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from itertools import pairwise
from typing import TypeGuard

import redis
from celery import Celery
from celery.events.dispatcher import EventDispatcher
from kombu.exceptions import OperationalError
from kombu.messaging import Producer

from pagedq.producer.completion import FALLBACK_S, wait_pushed, wait_replied
from pagedq.producer.errors import TaskAlreadyFinished
from pagedq.producer.parsing import RequestInput, parse_request, parse_requests
from pagedq.producer.replies import Replies
from pagedq.producer.status import needs_expiry, task_status
from pagedq.producer.submission import BatchMessage, Submission, batch_messages
from pagedq.shared.celery_config import BATCH_TASK_NAMES, QUEUES, TASK_NAMES, celery_priority, make_celery
from pagedq.shared.errors import InvalidRequest, ModelNotFound, PagedqError, TaskNotFound
from pagedq.shared.models import SubmitResponse, TaskError, TaskRequest, TaskState, TaskStatus, TaskType
from pagedq.shared.records import STATUS_FIELDS, NewRecord, TaskRecords
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Settings, get_settings

#: Model name sent when there is no registry and the request names none; the worker picks its default.
DEFAULT_MODEL = "default"

#: How long the registry the live workers publish is reused before it is read again (seconds).
PUBLISHED_TTL_S = 2.0

#: Tasks submitted here whose submitted status is kept for a wait on the reply channel (a few bulks' worth).
MAX_SUBMITTED = 50_000
#: type, model, priority, created_at, deadline (epoch s): a queued task's status as submitted
_Submitted = tuple[TaskType, str, int, datetime, float]

#: Messages per pipelined group when sending a bulk (progress is reported per group): the groups double from
#: one message up to this many, so a worker starts on the first message at once and is never starved while the
#: rest is recorded (recording runs ~5x faster than the engine classifies the tiny demo model).
SEND_BATCH = 256

ProgressCallback = Callable[[int, int], None]  # (done, total)



class _Sent:
    """What `send_task` returns here: nothing to wait on (results are read from the task records)."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.ignored = True


#: No Celery result for a sent task: `ignore_result` skips the result backend's subscription per send, and
#: `_Sent` the AsyncResult whose finalizer unsubscribes again (two pub/sub commands per task, for nothing).
_NO_CELERY_RESULT = {"ignore_result": True, "result_cls": _Sent}

CANCELLED_ERROR = TaskError(type="TaskCancelled", message="the task was cancelled before it started")


class TaskService:
    """Submit, inspect, cancel and wait for tasks, straight on Redis and Celery.

    The model, language pair and QA mode of every request are checked before anything is written, against
    (first that applies) the `registry` given, the models the live workers serve (each publishes its
    registry in its lease, without the models it refused: `Registry.published`; read again every
    `PUBLISHED_TTL_S`), or the file at `settings.registry_path`. With none of them (no worker up yet, no
    file) `request.model` is trusted and the worker decides.
    """

    def __init__(self, settings: Settings | None = None, registry: Registry | None = None, *,
                 listen: bool = False) -> None:
        """`listen`: keep a reply channel (producer/replies.py) and wait for the tasks submitted here on it, with
        no per-task subscription or read (the Python client; the HTTP API waits by id, asynchronously)."""
        self.settings = settings or get_settings()
        self._given = registry is not None
        if registry is None and self.settings.registry_path is not None:
            registry = Registry.load(self.settings.registry_path)
        self.registry = registry
        self._published: tuple[float, Registry | None, dict[str, str]] = (-math.inf, None, {})
        self.celery: Celery = make_celery(self.settings, main="pagedq-producer")
        self.records = TaskRecords.from_url(self.settings.backend_url, self.settings.result_ttl_s)
        self._local = threading.local()
        self._replies = Replies(self.records.redis) if listen else None
        #: what the status of a task submitted here (and not yet waited to the end) is made of, as submitted
        #: (oldest dropped past MAX_SUBMITTED: a wait for such a task reads its record, as for one submitted
        #: elsewhere); a tuple, not a TaskStatus: ~250 bytes a task, not ~3 KB
        self._submitted: OrderedDict[str, _Submitted] = OrderedDict()
        self._submitted_lock = threading.Lock()

    # -- submission ---------------------------------------------------------------------------------------

    def submit(self, task_type: TaskType, request: RequestInput) -> SubmitResponse:
        """Validate, record and enqueue one request. Raises ValidationError or a PagedqError first."""
        submission = self._prepare(task_type, parse_request(task_type, request, self.settings.limits),
                                   served=self._served())
        self._create_records([submission])
        try:
            self._send(submission)
        except Exception:
            self._forget([submission])
            raise
        return submission.response

    def submit_bulk(
        self, task_type: TaskType, requests: Sequence[RequestInput], on_progress: ProgressCallback | None = None
    ) -> list[SubmitResponse]:
        """Validate ALL requests, then record and send them, the first message's items first (see `_send_all`).

        Nothing is recorded or enqueued if any item is invalid: the ValidationError names each bad item by
        index, a registry error says `request N: ...`. `on_progress(done, total)` follows the sending.
        """
        limit = self.settings.limits.max_bulk
        if len(requests) > limit:
            raise InvalidRequest(f"a bulk submission holds at most {limit} requests; got {len(requests)}")
        parsed = parse_requests(task_type, requests, self.settings.limits)
        served = self._served()
        submissions = [self._prepare(task_type, request, served, index) for index, request in enumerate(parsed)]
        self._send_all(submissions, on_progress)
        return [s.response for s in submissions]

    def _prepare(self, task_type: TaskType, request: TaskRequest,
                 served: tuple[Registry | None, dict[str, str]], index: int | None = None) -> Submission:
        now = time.time()
        timeout_s = request.timeout_s or self.settings.default_timeout_s
        return Submission(
            id=str(uuid.uuid4()),
            task_type=task_type,
            request=request,
            model=self._model_for(task_type, request, served, index),
            submitted_at=now,
            deadline=now + timeout_s,
        )

    def _model_for(self, task_type: TaskType, request: TaskRequest,
                   served: tuple[Registry | None, dict[str, str]], index: int | None) -> str:
        registry, refused = served
        if registry is None:
            return request.model or DEFAULT_MODEL
        try:
            try:
                return registry.select(task_type, request).name
            except ModelNotFound:
                if request.model in refused:
                    raise ModelNotFound(f"model {request.model!r} is not served: the workers refused it when "
                                        f"they loaded it ({refused[request.model]})") from None
                raise
        except PagedqError as exc:
            if index is None:
                raise
            raise type(exc)(f"request {index}: {exc}") from None

    def _served(self) -> tuple[Registry | None, dict[str, str]]:
        """The registry requests are checked against, and the models the workers refused (see the class)."""
        if self._given:
            return self.registry, {}
        at, registry, refused = self._published
        if time.monotonic() - at > PUBLISHED_TTL_S:
            try:
                published = [entry for info in self.records.live_workers().values()
                             if isinstance(entry := info.get("registry"), dict)]
                registry, refused = Registry.from_published(published)
            except (redis.RedisError, ValueError):  # Redis down (the submission fails next) or a bad entry
                registry, refused = None, {}
            self._published = (time.monotonic(), registry, refused)
        return (registry, refused) if registry is not None else (self.registry, refused)

    def _create_records(self, submissions: Sequence[Submission]) -> None:
        notify = self._replies.start() if self._replies is not None else None  # subscribed before any record
        created = self.records.create_many(
            [NewRecord(s.id, s.task_type, s.model, s.request.priority, _utc(s.deadline), s.message)
             for s in submissions], notify)
        if notify is not None:
            with self._submitted_lock:
                for s in submissions:
                    self._submitted[s.id] = (s.task_type, s.model, s.request.priority, created, s.deadline)
                while len(self._submitted) > MAX_SUBMITTED:
                    self._submitted.popitem(last=False)

    def _events(self) -> EventDispatcher:
        """This thread's dispatcher of the `task-sent` events (what Flower shows before a worker takes a task).
        Celery's own is one per app and holds a lock while it publishes, a Redis round trip: every thread of
        the HTTP API, or of an app sharing one client, queued behind it. Measured with 32 threads submitting
        through one `TaskService` to a Redis 1 ms away each way (a delaying proxy): 256 -> 743-829
        submissions/s, p50 87-122 -> 31-33 ms; with Redis on the same host, no difference.
        Made as Celery makes its own (publishing through the caller's producer, so it needs no connection)."""
        dispatcher: EventDispatcher | None = getattr(self._local, "events", None)
        if dispatcher is None:
            dispatcher = self._local.events = self.celery.events.Dispatcher(enabled=False)
        return dispatcher

    def _send(self, submission: Submission, producer: Producer | None = None) -> None:
        self.celery.send_task(
            TASK_NAMES[submission.task_type],
            args=[submission.message],
            task_id=submission.id,
            queue=QUEUES[submission.task_type],
            priority=celery_priority(submission.request.priority),
            producer=producer,
            event_dispatcher=self._events(),
            argsrepr=submission.summary,  # what Flower shows; cheaper than Celery's repr of a long text
            kwargsrepr="{}",
            **_NO_CELERY_RESULT,
        )

    def _send_batch(self, message: BatchMessage, producer: Producer | None = None) -> None:
        self.celery.send_task(
            BATCH_TASK_NAMES[message.task_type],
            args=[message.body],
            task_id=message.id,
            queue=QUEUES[message.task_type],
            priority=celery_priority(message.priority),
            producer=producer,
            event_dispatcher=self._events(),
            argsrepr=message.summary,  # Flower shows the item count
            kwargsrepr="{}",
            **_NO_CELERY_RESULT,
        )

    def _send_all(self, submissions: Sequence[Submission], on_progress: ProgressCallback | None) -> None:
        """Record and send a bulk as messages of `bulk_message_items` items, through one producer in pipelined
        groups (kombu >= 5.7), each group's records written (one pipeline) just before it is sent: the first
        group is the first message alone, so a worker starts on it while the rest is recorded, and the groups
        double from there (up to `SEND_BATCH` messages) so that the queue stays ahead of the workers. A group that
        fails is discarded and the records of its items and of every later item are removed before the error
        propagates."""
        messages = batch_messages(submissions, self.settings.bulk_message_items)
        total, sent = len(submissions), 0
        bounds = _group_bounds(len(messages))
        with self.celery.producer_or_acquire() as producer:
            for start, end in pairwise(bounds):
                group = messages[start:end]
                try:
                    self._create_records([s for m in group for s in m.items])
                    with _batched(producer):
                        for message in group:
                            self._send_batch(message, producer)
                except Exception:
                    self._forget([s for m in messages[start:] for s in m.items])
                    raise
                sent += sum(len(m.items) for m in group)
                if on_progress is not None:
                    on_progress(sent, total)

    def _forget(self, submissions: Sequence[Submission]) -> None:
        """Best effort: Redis may be what failed."""
        with self._submitted_lock:
            for s in submissions:
                self._submitted.pop(s.id, None)
        with suppress(redis.RedisError):
            self.records.delete([s.id for s in submissions])

    # -- inspection and control ---------------------------------------------------------------------------

    def status(self, task_id: str) -> TaskStatus:
        """The task's current status; TaskNotFound for an id that was never submitted (or has expired)."""
        return self.statuses([task_id])[0]

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        """Many statuses in one round trip (one pipeline of record reads).

        A task past its deadline without a final state is expired now, whatever its worker is doing: the
        reader persists that with `finalize` (the first final state written wins, so it never flips)."""
        records = self.records.get_many(task_ids, STATUS_FIELDS)
        now = datetime.now(UTC)
        found = []
        for task_id, record in zip(task_ids, records, strict=True):
            if not _is_submitted(record):
                raise TaskNotFound(f"no task with id {task_id!r}")
            status = task_status(task_id, record, now)
            if needs_expiry(status, record):
                status = self._persist_expiry(task_id, status)
            found.append(status)
        return found

    def _persist_expiry(self, task_id: str, derived: TaskStatus) -> TaskStatus:
        error = derived.error.model_dump() if derived.error else None
        if self.records.finalize(task_id, TaskState.EXPIRED, error=error) is TaskState.EXPIRED:
            return derived
        record = self.records.get(task_id)  # another final state was written first: it holds
        if not _is_submitted(record):
            raise TaskNotFound(f"no task with id {task_id!r}")
        return task_status(task_id, record, datetime.now(UTC))

    def cancel(self, task_id: str) -> TaskStatus:
        """Cancel the task; TaskAlreadyFinished if it already reached a final state.

        A queued task is cancelled at once (its message is skipped when a worker takes it); a running one
        is cancelled by its worker, which the revoke reaches within a fraction of a second."""
        current = self.status(task_id)
        if current.state.is_final:
            raise TaskAlreadyFinished(f"task {task_id} already finished ({current.state.value}); nothing to cancel")
        self.records.request_cancel(task_id)
        if current.state is TaskState.QUEUED:
            self.records.finalize(task_id, TaskState.CANCELLED, error=CANCELLED_ERROR.model_dump())
        self.celery.control.revoke(task_id)
        return self.status(task_id)

    def wait(self, task_id: str, timeout_s: float | None = None, poll_interval: float = FALLBACK_S) -> TaskStatus:
        """The final status, as soon as the worker writes it (pushed, not polled); TimeoutError after
        `timeout_s` (None: no limit). `poll_interval` is the first fallback read's delay."""
        return self.wait_all([task_id], timeout_s, poll_interval=poll_interval)[0]

    def wait_all(self, task_ids: Sequence[str], timeout_s: float | None = None,
                 on_progress: ProgressCallback | None = None, poll_interval: float = FALLBACK_S) -> list[TaskStatus]:
        """Final statuses of every task, in `task_ids` order (see `pagedq.producer.completion`)."""
        if self._replies is not None:
            with self._submitted_lock:
                submitted = {t: fields for t in task_ids if (fields := self._submitted.get(t)) is not None}
            if len(submitted) == len(set(task_ids)):  # all submitted here: their notices come on the reply channel
                # built from what this client submitted; validated: pydantic-core's validation (4 us) is 3x
                # faster than model_construct, which copies each default in Python
                known = {t: TaskStatus(id=t, type=task_type, state=TaskState.QUEUED, model=model or None,
                                       priority=priority, created_at=created, deadline=_utc(deadline))
                         for t, (task_type, model, priority, created, deadline) in submitted.items()}
                statuses = wait_replied(self._replies, known, self.statuses, task_ids, timeout_s, on_progress,
                                        poll_interval, self.records.settled)
                with self._submitted_lock:
                    for task_id in known:
                        self._submitted.pop(task_id, None)
                return statuses
        return wait_pushed(self._pubsub(), self.statuses, task_ids, timeout_s, on_progress, poll_interval,
                           self.records.settled)

    def _pubsub(self) -> redis.client.PubSub:
        """This thread's subscriber connection, kept between waits (a connection per wait costs a handshake)."""
        pubsub: redis.client.PubSub | None = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = self._local.pubsub = self.records.redis.pubsub(ignore_subscribe_messages=True)
        return pubsub

    def ping_redis(self, timeout_s: float = 1.0) -> None:
        """Raise redis.RedisError unless the broker's Redis (and the result backend's, if separate) answer."""
        for url in dict.fromkeys([self.settings.redis_url, self.settings.backend_url]):
            with redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) as client:
                client.ping()

    def ready_workers(self) -> list[str]:
        """Host names of the worker processes that hold a live lease with a running engine (one Redis round
        trip; a worker renews its lease every second, see worker/lease.py)."""
        return sorted(str(info.get("hostname", worker)) for worker, info in self.records.live_workers().items()
                      if info.get("ready", True))

    def ping_workers(self, timeout_s: float = 1.0) -> list[str]:
        """Host names of the Celery workers that answered a ping within `timeout_s`."""
        try:
            replies = self.celery.control.ping(timeout=timeout_s) or []
        except OperationalError:  # a pooled broker connection that died with a Redis restart: once more
            replies = self.celery.control.ping(timeout=timeout_s) or []
        return sorted(name for reply in replies for name in reply)

    def close(self) -> None:
        if self._replies is not None:
            self._replies.close()
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is not None:
            pubsub.close()
        self.records.redis.close()
        self.celery.close()


def _is_submitted(record: dict[str, str] | None) -> TypeGuard[dict[str, str]]:
    """A record the producer wrote (a worker's `mark` on an expired record leaves only its own fields)."""
    return record is not None and "type" in record and "created_at" in record


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _group_bounds(count: int) -> list[int]:
    """Where the send groups of `count` messages start and end: groups of 1, 2, 4, ... `SEND_BATCH` messages."""
    bounds, size = [0], 1
    while bounds[-1] < count:
        bounds.append(min(bounds[-1] + size, count))
        size = min(size * 2, SEND_BATCH)
    return bounds if count else []


@contextmanager
def _batched(producer: Producer) -> Iterator[None]:
    batch = getattr(producer, "batch", None)  # kombu < 5.7 publishes one message at a time
    with batch() if batch is not None else nullcontext():
        yield


