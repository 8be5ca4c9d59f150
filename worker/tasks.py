"""The Celery tasks: thin. Claim, validate, submit to the engine, wait, write each final state once.

Two message kinds per task type (see producer/submission.py): `pagedq.<type>` carries one task,
`pagedq.<type>.batch` carries the items of a bulk submission. Both run the same path over a list of items:

    claim_many (one round trip)   -> per item: run | final | owned | mine | cancelled | expired | missing
    submit every runnable item    -> the engine batches them with everything else in flight
    as futures complete           -> finalize_many (one round trip per wake-up, shared with the other task
                                     threads finishing then: worker/group_commit.py; first final state wins)
    items the engine handed back  -> release them, reject the message with requeue (worker shutting down)

`claim` decides atomically in Redis (shared/records.py): a redelivered message runs only the items that are
neither final nor owned by a live worker, so a redelivery never runs or stores an item twice. One bad item
fails alone. Nothing is stored in Celery's result backend; the task records are the results.
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

from celery import Celery, Task
from celery.exceptions import Reject
from celery.worker import state as worker_state
from celery.worker.request import Request
from pydantic import ValidationError
from redis.exceptions import RedisError

from pagedq.shared.celery_config import BATCH_TASK_NAMES, TASK_NAMES
from pagedq.shared.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    PagedqError,
    TaskCancelled,
    WorkerShuttingDown,
)
from pagedq.shared.models import REQUEST_MODELS, TaskRequest, TaskState, TaskType
from pagedq.shared.records import Claim, Outcome
from pagedq.shared.registry import ModelSpec
from pagedq.worker import metrics
from pagedq.worker.engine.core.executor import EngineRequest
from pagedq.worker.runtime import WorkerRuntime, current_runtime

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting task thread looks for revokes from the Celery side

#: Error classes that are not plain failures, and the final state each one means.
_STATE_OF_ERROR: dict[type[BaseException], TaskState] = {
    DeadlineExceeded: TaskState.EXPIRED,
    TaskCancelled: TaskState.CANCELLED,
}
#: claims that finalize the task themselves: its final state, and the error type the claim stored
_CLAIM_OUTCOMES = {Claim.CANCELLED: (TaskState.CANCELLED, "TaskCancelled"),
                   Claim.EXPIRED: (TaskState.EXPIRED, "DeadlineExceeded")}


@dataclass(eq=False)
class Item:
    """One task of a message: its id, its message body, and what happened to it here."""

    id: str
    message: dict[str, Any]
    request: EngineRequest | None = None
    error: PagedqError | None = None
    cancel_sent: bool = False
    model: str = ""  # the registry name it runs on, once chosen


class DecodedRequest(Request):
    """Celery's task Request, handing the task thread the body the consumer already decoded.

    Celery 5.7's message handler reads `message.payload` (decoding the body: JSON) to tell protocol 1 from 2,
    and its Request keeps the raw body, which the pool decodes again in the task thread (`fast_trace_task`).
    In the threads pool both run in this process: a bulk's batch message of 512 items was decoded twice, half
    of the JSON decoding that took ~13% of the Celery process's time on W5's bulk. With the body decoded
    already (it is, whenever Celery's handler made this Request), the pool gets that: content type None, and
    `fast_trace_task` unpacks `(args, kwargs, embed)` as it is."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        if self._decoded:  # type: ignore[has-type]  # given decoded (Celery's protocol 1 conversion): kept
            return
        decoded = message.payload  # what Celery's Request read above: decoded once, cached on the message
        if isinstance(decoded, list | tuple) and len(decoded) == 3:
            self._body, self._decoded = decoded, True
            self._content_type = self._content_encoding = None


def register_tasks(app: Celery) -> None:
    for task_type in TaskType:
        _register(app, task_type)


def _register(app: Celery, task_type: TaskType) -> None:
    # throws: a user-level failure is logged on one line, without a traceback
    @app.task(name=TASK_NAMES[task_type], bind=True, ignore_result=True, throws=(PagedqError,), Request=DecodedRequest)
    def run(self: Task, message: dict[str, Any]) -> str:
        [item] = run_items(self, current_runtime(self.app), task_type, [Item(self.request.id, message)])
        if item.error is not None:
            raise item.error
        return "done"

    @app.task(name=BATCH_TASK_NAMES[task_type], bind=True, ignore_result=True, throws=(PagedqError,),
              Request=DecodedRequest)
    def run_batch(self: Task, body: dict[str, Any]) -> str:
        items = _batch_items(body)
        run_items(self, current_runtime(self.app), task_type, items)
        failed = sum(1 for i in items if i.error is not None)
        return f"{len(items)} items, {failed} failed"


def _batch_items(body: Any) -> list[Item]:
    try:
        return [Item(str(entry["id"]), entry) for entry in body["items"]]
    except (KeyError, TypeError) as exc:
        raise InvalidRequest(f"invalid batch message: {exc!r}") from None


def run_items(task: Task, rt: WorkerRuntime, task_type: TaskType, items: list[Item]) -> list[Item]:
    """Run one delivery of a message's items (see the module docstring)."""
    tag = str((task.request.delivery_info or {}).get("delivery_tag") or "")
    claims = rt.records.claim_many([i.id for i in items], rt.worker_id, tag, rt.lease_prefix)
    runnable, ended = [], []
    for item, claim in zip(items, claims, strict=True):
        if claim in (Claim.RUN, Claim.MINE) and rt.take(item.id):  # `take`: not running here already
            runnable.append(item)
        elif claim in _CLAIM_OUTCOMES:
            state, error_type = _CLAIM_OUTCOMES[claim]
            ended.append(metrics.Finished(_model_label(item), item.message, state.value, error_type))
        else:
            log.info("task %s: %s%s, not run by this delivery", item.id, claim.value,
                     " and running here already" if claim in (Claim.RUN, Claim.MINE) else "")
    metrics.tasks_started(task_type.value, [(_model_label(item), item.message) for item in runnable])
    metrics.tasks_finished(task_type.value, ended)
    try:
        if len(runnable) > 1:
            with rt.preparing:
                rejected = _submit(rt, task_type, runnable)
        else:  # one item: nothing to gain from waiting for another message's preparation
            rejected = _submit(rt, task_type, runnable)
        _finalize(rt, task_type, runnable, rejected)
        _wait(rt, task_type, [i for i in runnable if i.request is not None])
    except RedisError as exc:
        # Redis stayed down longer than the client's retries: what is not final stays claimed by this worker;
        # once it is no longer in flight here, the reconciler hands it back (Reconciler.recover_own)
        log.warning("%d tasks left claimed while Redis is unreachable: %s", len(runnable), exc)
        raise
    finally:
        for item in runnable:
            rt.inflight.discard(item.id)
    handed_back = [i for i in runnable if isinstance(i.error, WorkerShuttingDown)]
    if handed_back:
        for item in handed_back:
            rt.records.release(item.id, rt.worker_id)
        raise Reject(f"the worker is shutting down: {len(handed_back)} tasks handed back to the queue", requeue=True)
    return items


def _submit(rt: WorkerRuntime, task_type: TaskType, items: list[Item]) -> list[Outcome]:
    """Hand the items to the engine in one `submit_many`; the failure outcomes of those that cannot run (an
    invalid request fails alone). Items the engine refuses because the worker stops are marked handed back."""
    outcomes, requests = [], []
    for item in items:
        try:
            requests.append(_engine_request(rt, task_type, item))
        except (KeyError, TypeError, ValidationError) as exc:
            outcomes.append(_failed(item, InvalidRequest(f"invalid {task_type.value} request: {exc}")))
        except PagedqError as exc:
            outcomes.append(_failed(item, exc))
    if not requests:
        return outcomes
    try:
        rt.engine.submit_many(requests)
    except WorkerShuttingDown as exc:
        for item in items:
            if item.request is not None:
                item.error, item.request = exc, None
    except PagedqError as exc:
        outcomes += [_failed(item, exc) for item in items if item.request is not None]
    return outcomes


def _engine_request(rt: WorkerRuntime, task_type: TaskType, item: Item) -> EngineRequest:
    """The item's validated request, set on `item.request` (raises for an invalid or expired item)."""
    payload = cast(TaskRequest, REQUEST_MODELS[task_type].model_validate(item.message["request"]))
    deadline = item.message.get("deadline")
    if deadline is not None and time.time() >= deadline:
        raise DeadlineExceeded("deadline passed while the task was queued")
    spec = _model_for(rt, task_type, item.message, payload)
    item.model = spec.name
    item.request = EngineRequest(id=item.id, task=task_type, payload=payload, model=spec.name,
                                 priority=payload.priority, deadline=deadline)
    if _wants_stream(payload) and rt.streamer is not None:
        item.request.stream = rt.streamer.sink(item.id)
    return item.request


def _model_label(item: Item) -> str:
    """The model a task ran on (its registry name), else the one its message named."""
    if item.model:
        return item.model
    name = item.message.get("model") if isinstance(item.message, dict) else None
    return name if isinstance(name, str) else "unknown"


def _wants_stream(payload: Any) -> bool:
    # a field lookup, not getattr: a pydantic model without the attribute answers getattr through its slow
    # __getattr__ and a formatted AttributeError (12% of a batch message's thread time for classify requests)
    generation = payload.__dict__.get("generation")
    return bool(getattr(generation, "stream", False))


def _model_for(rt: WorkerRuntime, task_type: TaskType, message: dict[str, Any], payload: Any) -> ModelSpec:
    """The registry entry named by the producer, else the registry's choice for this request."""
    name = message.get("model")
    spec = rt.registry.models.get(name) if isinstance(name, str) else None
    if spec is not None and spec.task is task_type:
        return spec
    return rt.registry.select(task_type, payload)


def _failed(item: Item, error: PagedqError) -> Outcome:
    item.error, item.request = error, None
    state = _STATE_OF_ERROR.get(type(error), TaskState.FAILED)
    return Outcome(item.id, state, error={"type": type(error).__name__, "message": str(error)})


def _outcome(item: Item, future: Future[Any]) -> Outcome | None:
    """The final outcome of a completed engine future; None if the engine handed the item back."""
    error = future.exception()
    if error is None:  # a result model, or its JSON form already (the engine-core process's futures)
        result = future.result()
        return Outcome(item.id, TaskState.SUCCEEDED,
                       result=result if isinstance(result, dict) else result.model_dump(mode="json"))
    if isinstance(error, WorkerShuttingDown):
        item.error = error
        return None
    if not isinstance(error, PagedqError):  # a bug in our code: the task fails, the worker stays up
        log.error("task %s failed: %r", item.id, error, exc_info=error)
        error = EngineError(f"{type(error).__name__}: {error}")
    return _failed(item, error)


def _wait(rt: WorkerRuntime, task_type: TaskType, items: list[Item]) -> None:
    """Wait for the engine; finalize items as they complete; forward Celery revokes to the engine.

    Completions arrive through one queue (a done-callback per future), so a wake-up costs O(what completed),
    not O(items): a batch message of K items is O(K) in all, not O(K^2). The callback carries the item's id,
    not the item: a Future keeps its callbacks after it completes, and future -> callback -> item -> request ->
    future would be a reference cycle per item, left for the garbage collector (~55,000 objects, 30-50 ms per
    full collection, in every 2,000-text bulk) instead of freed when the task ends."""
    completed: queue.SimpleQueue[str] = queue.SimpleQueue()
    pending: dict[str, Item] = {}
    for item in items:
        if item.request is not None:
            pending[item.id] = item
            item.request.future.add_done_callback(functools.partial(_put_id, completed, item.id))
    next_revoke_check = time.monotonic() + POLL_S
    while pending:
        try:
            done = [completed.get(timeout=POLL_S)]
        except queue.Empty:
            done = []
        if done and len(pending) > 1:
            time.sleep(0)  # let the engine thread complete the rest of its step: one final write for them all
            while True:
                try:
                    done.append(completed.get_nowait())
                except queue.Empty:
                    break
        finished = [pending.pop(task_id) for task_id in done if task_id in pending]
        outcomes = [o for item in finished if (o := _outcome(item, item.request.future)) is not None]  # type: ignore[union-attr]
        _finalize(rt, task_type, finished, outcomes)
        if pending and time.monotonic() >= next_revoke_check:
            next_revoke_check = time.monotonic() + POLL_S
            revoked = worker_state.revoked  # look up the fewer: a batch waits for hundreds of items
            try:
                ids = [t for t in tuple(revoked) if t in pending] if len(revoked) < len(pending) else \
                    [t for t in pending if t in revoked]
            except RuntimeError:  # a revoke arrived while the set was copied (the consumer thread adds them)
                ids = [t for t in pending if t in revoked]
            for item in (pending[t] for t in ids):
                if not item.cancel_sent:
                    rt.engine.cancel(item.id, TaskCancelled("cancelled while running"))
                    item.cancel_sent = True


def _put_id(completed: queue.SimpleQueue[str], task_id: str, _future: Future[Any]) -> None:
    completed.put(task_id)


def _finalize(rt: WorkerRuntime, task_type: TaskType, items: list[Item], outcomes: list[Outcome]) -> None:
    """Write the outcomes (one round trip); a streamed task's stream is completed first, so a reader that
    sees the final state finds the whole stream."""
    if not outcomes:
        return
    by_id = {i.id: i for i in items}
    for outcome in outcomes:
        request = by_id[outcome.task_id].request
        if rt.streamer is not None and request is not None and request.stream is not None:
            text = (outcome.result or {}).get("answer") or (outcome.result or {}).get("translation") or ""
            rt.streamer.close(outcome.task_id, outcome.state.value, str(text))
    rt.finalizer.commit(outcomes)  # with the outcomes other task threads write now: one round trip
    metrics.tasks_finished(task_type.value, [_finished(by_id[outcome.task_id], outcome) for outcome in outcomes])


def _finished(item: Item, outcome: Outcome) -> metrics.Finished:
    error_type = None if outcome.state is TaskState.SUCCEEDED else (outcome.error or {}).get("type", "Error")
    request = item.request
    timing = (request.arrival, request.first_token_at, request.finished_at) if request is not None else None
    return metrics.Finished(_model_label(item), item.message, outcome.state.value, error_type,
                            outcome.result if isinstance(outcome.result, dict) else None, timing)
