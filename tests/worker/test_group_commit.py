"""Group commit (worker/group_commit.py): task threads' final writes share Redis round trips.

Against a real Redis through `TaskRecords.finalize_many`, as the worker uses it."""

from __future__ import annotations

import threading
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pagedq.shared.models import TaskState
from pagedq.shared.records import Outcome, TaskRecords
from pagedq.worker.group_commit import GroupCommit


def test_each_writer_gets_its_own_results_and_writes_share_calls() -> None:
    calls: list[list[int]] = []

    def slow_square(items: list[int]) -> list[int]:
        calls.append(items)
        time.sleep(0.02)  # a round trip: writers arriving meanwhile queue up for the next call
        return [i * i for i in items]

    commit = GroupCommit(slow_square)
    results: dict[int, list[int]] = {}
    start = threading.Barrier(16)

    def writer(k: int) -> None:
        start.wait()
        results[k] = commit.commit([k, 100 + k])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: [k * k, (100 + k) ** 2] for k in range(16)}
    assert sorted(i for call in calls for i in call) == sorted([*range(16), *range(100, 116)])  # each once
    assert commit.calls == len(calls) <= 4  # 16 writers, a handful of calls
    assert commit.commit([]) == [] and commit.calls == len(calls)


def test_a_failed_call_fails_the_writers_it_carried_and_the_next_call_works() -> None:
    fail = threading.Event()
    fail.set()

    def write(items: list[str]) -> list[str]:
        if fail.is_set():
            time.sleep(0.02)
            raise RedisConnectionError("Redis went away")
        return [f"ok:{i}" for i in items]

    commit = GroupCommit(write)
    errors: list[BaseException] = []

    def writer(item: str) -> None:
        try:
            commit.commit([item])
        except RedisConnectionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(str(k),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4
    fail.clear()
    assert commit.commit(["a", "b"]) == ["ok:a", "ok:b"]


@pytest.fixture()
def records(redis_url: str) -> TaskRecords:
    return TaskRecords.from_url(redis_url, ttl_s=60)  # a private Redis, flushed after the test


def test_concurrent_finalizes_through_redis_each_write_once(records: TaskRecords) -> None:
    """32 task threads finishing at once: each final state is written, the first one wins, in fewer calls."""
    ids = [f"gc-{k}" for k in range(32)]
    for task_id in ids:
        records.redis.hset(f"pagedq:task:{task_id}", mapping={"id": task_id, "type": "classify"})
    commit = GroupCommit(records.finalize_many)
    start = threading.Barrier(len(ids))
    states: dict[str, TaskState | None] = {}

    def writer(task_id: str) -> None:
        start.wait()
        [states[task_id]] = commit.commit([Outcome(task_id, TaskState.SUCCEEDED, result={"label": task_id})])

    threads = [threading.Thread(target=writer, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states == dict.fromkeys(ids, TaskState.SUCCEEDED) and commit.calls < len(ids)
    again = commit.commit([Outcome(ids[0], TaskState.FAILED, error={"type": "X", "message": "late"})])
    assert again == [TaskState.SUCCEEDED]  # the first final state holds
    assert records.redis.hget(f"pagedq:task:{ids[0]}", "state") == "succeeded"
