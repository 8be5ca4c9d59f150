"""Faults on real processes: a private redis-server, real Celery workers over tiny models, the real API.

The promise under test: a task reaches exactly one final state, once, and keeps it; nothing a user submits
is lost by a worker stop (SIGTERM or SIGKILL), a Redis restart or a redelivery; one request only fails
itself; a task whose worker is gone is re-run within seconds. A `Watcher` polls every task's status all
along and records every state it saw, so a flip (a final state that later changes) fails the test.

The tests share one stack and run in order (each leaves a worker running for the next), to keep the
suite near two minutes: worker starts dominate it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pagedq.producer.service import TaskService
from pagedq.shared.celery_config import make_celery
from pagedq.shared.models import TaskState, TaskType
from pagedq.shared.records import TaskRecords, task_key
from scripts.stack import Stack

pytestmark = pytest.mark.integration

#: fast leases so that recovery is measured in seconds
LEASE_ENV = {"PAGEDQ_LEASE_TTL_S": "3", "PAGEDQ_HEARTBEAT_INTERVAL_S": "0.5", "PAGEDQ_RECONCILE_INTERVAL_S": "1",
             "PAGEDQ_LOST_MESSAGE_GRACE_S": "2"}
#: generative QA on the demo causal LM, which never stops early: a few hundred ms per task, in batches
LONG = {"question": "who wrote it?", "context": "Ada wrote the first program. " * 4, "mode": "generative",
        "generation": {"max_new_tokens": 400}}
SHORT = {"text": "a perfectly fine sentence", "generation": {"max_new_tokens": 8}}
FINAL = {s.value for s in TaskState if s.is_final}


@pytest.fixture(scope="module")
def stack(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(registry_path=demo_models, log_dir=tmp_path_factory.mktemp("logs"), worker_concurrency=16,
              extra_env={**LEASE_ENV, "PAGEDQ_DRAIN_TIMEOUT_S": "30"}).start(flower=False)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def service(stack: Stack) -> Iterator[TaskService]:
    # bulks in messages of 8 items: a bulk of tens spreads over every worker (the faults need that)
    svc = TaskService(stack.settings().model_copy(update={"bulk_message_items": 8}))
    yield svc
    svc.close()


class Watcher(threading.Thread):
    """Polls the statuses of `ids` every 50 ms until all are final and records each task's state sequence."""

    def __init__(self, service: TaskService, ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.service, self.ids = service, ids
        self.seen: dict[str, list[str]] = defaultdict(list)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                for status in self.service.statuses(self.ids):
                    states = self.seen[status.id]
                    if not states or states[-1] != status.state.value:
                        states.append(status.state.value)
            except redis.RedisError:
                pass  # Redis restarting
            if self.ids and all(self.seen[i] and self.seen[i][-1] in FINAL for i in self.ids):
                return
            time.sleep(0.05)

    def final(self, timeout_s: float = 90) -> dict[str, str]:
        self.join(timeout_s)
        self.stopped.set()
        unfinished = {i: self.seen[i] for i in self.ids if not self.seen[i] or self.seen[i][-1] not in FINAL}
        assert not unfinished, f"{len(unfinished)} tasks not final (lost or stuck): {list(unfinished.items())[:3]}"
        flips = {i: s for i, s in self.seen.items() if any(x in FINAL for x in s[:-1])}
        assert not flips, f"final states changed: {flips}"
        return {i: self.seen[i][-1] for i in self.ids}


def watch(service: TaskService, ids: list[str]) -> Watcher:
    watcher = Watcher(service, ids)
    watcher.start()
    return watcher


def submit_many(service: TaskService, n: int, body: dict[str, Any] = LONG) -> list[str]:
    task = TaskType.QA if "question" in body else TaskType.TRANSLATE
    return [s.id for s in service.submit_bulk(task, [body] * n)]


def wait_until(predicate: Any, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


def running(r: redis.Redis, ids: list[str], worker: str | None = None) -> list[str]:
    owners = [r.hget(task_key(i), "worker") for i in ids]
    states = [r.hget(task_key(i), "state") for i in ids]
    return [i for i, w, s in zip(ids, owners, states, strict=True)
            if w and not s and (worker is None or w.startswith(worker + "@"))]


@pytest.fixture(scope="module")
def r(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url or "", decode_responses=True)


def test_sigterm_finishes_in_flight_work_and_exits(stack: Stack, service: TaskService, r: redis.Redis) -> None:
    ids = submit_many(service, 40)
    watcher = watch(service, ids)
    wait_until(lambda: running(r, ids), 60, "a task starting")
    in_flight = running(r, ids)
    proc = stack.procs.pop("worker1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(45) == 0, "the worker did not exit by itself after its drain"
    states = {i: r.hget(task_key(i), "state") for i in in_flight}
    assert set(states.values()) == {"succeeded"}, states  # every task in flight at SIGTERM finished
    stack.start_worker(env={"PAGEDQ_DRAIN_TIMEOUT_S": "0"})
    stack.wait_worker()
    assert set(watcher.final().values()) == {"succeeded"}


def test_sigterm_with_a_short_drain_hands_work_back_without_failing_it(
    stack: Stack, service: TaskService, r: redis.Redis
) -> None:
    ids = submit_many(service, 40)
    watcher = watch(service, ids)
    name = f"worker{stack.worker_count}"
    wait_until(lambda: len(running(r, ids)) >= 4, 60, "tasks starting")
    proc = stack.procs.pop(name)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    requeued = [i for i in ids if int(r.hget(task_key(i), "requeues") or 0) > 0]
    assert requeued, "a drain of 0 s finished everything: the test proved nothing"
    assert not [i for i in ids if r.hget(task_key(i), "state") == "failed"]
    # two workers for the next tests: one to kill, one that must recover its tasks
    stack.start_worker()
    stack.start_worker()
    stack.wait_worker(f"worker{stack.worker_count - 1}")
    stack.wait_worker()
    assert set(watcher.final().values()) == {"succeeded"}


def test_sigkill_is_recovered_within_the_lease(stack: Stack, service: TaskService, r: redis.Redis) -> None:
    victim = f"worker{stack.worker_count - 1}"
    ids = submit_many(service, 60)
    watcher = watch(service, ids)
    wait_until(lambda: len(running(r, ids, victim)) >= 2, 60, f"{victim} running tasks")
    stack.kill(victim)
    stranded = running(r, ids, victim)  # after the kill: its records still name it until the lease lapses
    assert stranded, "the victim finished everything before the kill: the test proved nothing"
    # lease 3 s + reconcile every 1 s: back on the queue (or running elsewhere) well within 10 s
    recovery = wait_until(lambda: not running(r, stranded, victim), 10, "recovery of the killed worker's tasks")
    assert recovery < 10
    assert all(int(r.hget(task_key(i), "requeues") or 0) >= 1 for i in stranded)
    assert set(watcher.final().values()) == {"succeeded"}
    # the bulk travelled in batch messages: a redelivered batch re-ran only its unfinished items, once
    deliveries = {i: int(r.hget(task_key(i), "deliveries") or 0) for i in ids}
    assert all(deliveries[i] == 2 for i in stranded)
    assert all(deliveries[i] == 1 for i in ids if i not in stranded)


def test_a_second_delivery_of_a_running_task_is_not_run_and_flips_nothing(
    stack: Stack, service: TaskService, r: redis.Redis
) -> None:
    [task_id] = submit_many(service, 1, {**LONG, "generation": {"max_new_tokens": 400}})
    done = r.pubsub()
    done.subscribe(f"pagedq:done:{task_id}")
    watcher = watch(service, [task_id])
    wait_until(lambda: running(r, [task_id]), 30, "the task starting")
    app = make_celery(stack.settings())
    message = json.loads(r.hget(task_key(task_id), "message") or "{}")
    app.send_task("pagedq.qa", args=[message], task_id=task_id, queue="pagedq.qa")
    assert watcher.final() == {task_id: "succeeded"}
    assert r.hget(task_key(task_id), "deliveries") == "1"
    time.sleep(0.5)
    published = [m for m in iter(lambda: done.get_message(timeout=0.2), None) if m["type"] == "message"]
    assert [json.loads(m["data"])["state"] for m in published] == ["succeeded"]  # one final state, announced once
    done.close()
    app.close()


def test_poison_requests_fail_alone(stack: Stack, service: TaskService, r: redis.Redis) -> None:
    """Requests the producer would refuse, sent raw (as a buggy or hostile producer could), mixed into a
    batch of good ones: only they fail, with a clear error, and the worker keeps serving."""
    good = submit_many(service, 12, SHORT)
    app = make_celery(stack.settings())
    poisons = {
        "surrogate": {"text": "bad \ud800 text"},
        "temperature": {"text": "hello", "generation": {"do_sample": True, "temperature": 1e-300}},
        "not a request": {"txet": 3},
    }
    poison_ids = []
    for name, request in poisons.items():
        task_id = f"poison-{name.replace(' ', '-')}-{time.time_ns()}"
        service.records.create(task_id, TaskType.TRANSLATE, "default", 0, None, {"request": request})
        app.send_task("pagedq.translate", args=[{"request": request, "model": "default"}], task_id=task_id,
                      queue="pagedq.translate")
        poison_ids.append(task_id)
    more_good = submit_many(service, 12, SHORT)
    states = watch(service, good + poison_ids + more_good).final()
    assert {states[i] for i in good + more_good} == {"succeeded"}
    for task_id in poison_ids:
        status = service.status(task_id)
        assert status.state is TaskState.FAILED and status.error is not None
        assert status.error.type in ("InvalidRequest", "ModelError"), status.error
    app.close()


def test_a_batch_message_with_an_invalid_and_a_cancelled_item(
    stack: Stack, service: TaskService, r: redis.Redis
) -> None:
    """Items of one bulk message each reach their own final state: the invalid one fails, the cancelled one is
    cancelled, the others succeed."""
    app = make_celery(stack.settings())
    stamp = time.time_ns()
    bodies = {f"ok-{stamp}-{i}": {"text": f"fine sentence {i}"} for i in range(4)}
    bodies[f"invalid-{stamp}"] = {"text": ""}
    bodies[f"cancelled-{stamp}"] = {"text": "cancelled before it ran"}
    deadline = time.time() + 60
    items = [{"id": i, "request": b, "model": "default", "deadline": deadline, "submitted_at": time.time()}
             for i, b in bodies.items()]
    for item in items:
        service.records.create(item["id"], TaskType.CLASSIFY, "default", 0, None, item)
    service.records.request_cancel(f"cancelled-{stamp}")
    app.send_task("pagedq.classify.batch", args=[{"items": items}], queue="pagedq.classify")
    states = watch(service, list(bodies)).final()
    assert states == {**{i: "succeeded" for i in bodies if i.startswith("ok")},
                      f"invalid-{stamp}": "failed", f"cancelled-{stamp}": "cancelled"}
    assert service.status(f"invalid-{stamp}").error.type == "InvalidRequest"  # type: ignore[union-attr]
    app.close()


def test_a_message_lost_by_the_broker_is_sent_again(stack: Stack, service: TaskService, r: redis.Redis) -> None:
    """kombu pops a message before it records it as unacked, so a worker stop in between loses it (kombu
    #305): the record says queued and no message exists anywhere. The reconciler sends it again, same id."""
    message = {"request": {"text": "lost in transit", "generation": {"max_new_tokens": 8}}, "model": "default",
               "deadline": time.time() + 60, "submitted_at": time.time()}
    task_id = f"lost-{time.time_ns()}"
    service.records.create(task_id, TaskType.TRANSLATE, "default", 0, None, message)  # and no message sent
    started = time.monotonic()
    assert watch(service, [task_id]).final(30) == {task_id: "succeeded"}
    assert time.monotonic() - started < 20  # grace 2 s, twice, plus a round: seconds, not a visibility timeout
    assert r.hget(task_key(task_id), "deliveries") == "1"


def test_redis_restart_loses_nothing(stack: Stack, service: TaskService) -> None:
    assert stack.redis is not None
    ids = submit_many(service, 30, {"text": "through a redis restart", "generation": {"max_new_tokens": 16}})
    watcher = watch(service, ids)
    stack.redis.restart(signal.SIGKILL, down_s=1.0)
    later = submit_retrying(service, 10)
    watcher_later = watch(service, later)
    assert set(watcher.final(120).values()) == {"succeeded"}
    assert set(watcher_later.final(120).values()) == {"succeeded"}
    exited = {name: proc.returncode for name, proc in stack.procs.items() if proc.poll() is not None}
    assert not exited, f"processes exited across the Redis restart: {exited}"


def submit_retrying(service: TaskService, n: int, timeout_s: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return submit_many(service, n, {"text": "after the restart", "generation": {"max_new_tokens": 8}})
        except Exception:  # noqa: BLE001 - the producer reconnects by itself; retry until Redis is back
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_deadline_holds_across_a_worker_kill(stack: Stack, service: TaskService, r: redis.Redis) -> None:
    [task_id] = submit_many(service, 1, {**LONG, "timeout_s": 4, "generation": {"max_new_tokens": 400}})
    watcher = watch(service, [task_id])
    wait_until(lambda: running(r, [task_id]), 30, "the task starting")
    for name in [n for n in list(stack.procs) if n.startswith("worker")]:
        stack.kill(name)  # every worker: nobody can finish it
    assert watcher.final(15) == {task_id: "expired"}
    records = TaskRecords(r, 60)
    assert records.finalize(task_id, TaskState.SUCCEEDED, result={}) is TaskState.EXPIRED
