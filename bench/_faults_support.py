"""What bench/faults.py measures with: the mixed workload, the watcher, the done-channel listener, the table.

The watcher is the user's view: it polls `TaskService.statuses` (task records only) and keeps, per id, the
sequence of states it saw. A flip is a final state followed by any other observation (a different final
state, a non-final one, or a record gone); `pagedq:done:<id>` publications are counted as a second witness,
since `finalize` publishes exactly once per final state it writes.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from pagedq.producer.service import TaskService
from pagedq.shared.errors import TaskNotFound
from pagedq.shared.models import TaskState, TaskType
from pagedq.shared.records import DONE_CHANNEL_PREFIX

FINAL = frozenset(s.value for s in TaskState if s.is_final)
RUNNING = TaskState.RUNNING.value
MISSING = "missing"  # the record is gone (never a TaskState): shown in state sequences

TEXTS = [
    "I loved this film, the acting was wonderful.", "The service was slow and the food was cold.",
    "It was fine, nothing special.", "What a fantastic day at the beach!", "The train was late again this morning.",
]  # fmt: skip
QUESTIONS = ["Who designed it?", "When was it completed?", "How tall is it?", "Who created it?"]
CONTEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the company of "
    "Gustave Eiffel and completed in 1889 for the World's Fair. It is 330 metres tall.",
    "Python is a programming language created by Guido van Rossum and first released in 1991.",
]


class Job(NamedTuple):
    task: TaskType
    request: dict[str, Any]


def mixed_jobs(n: int, seed: int, max_new_tokens: tuple[int, int]) -> list[Job]:
    """`n` requests, about 40% classify, 30% translate (8..48 new tokens), 30% generative QA on the demo
    causal LM (which never stops early, so `max_new_tokens` is its length: these are the long tasks)."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        draw, text = rng.random(), rng.choice(TEXTS)
        if draw < 0.4:
            jobs.append(Job(TaskType.CLASSIFY, {"text": text, "top_k": None}))
        elif draw < 0.7:
            jobs.append(
                Job(
                    TaskType.TRANSLATE,
                    {
                        "text": text,
                        "source_lang": "en",
                        "target_lang": "de",
                        "generation": {"max_new_tokens": rng.randint(8, 48)},
                    },
                )
            )
        else:
            jobs.append(
                Job(
                    TaskType.QA,
                    {
                        "question": rng.choice(QUESTIONS),
                        "context": rng.choice(CONTEXTS),
                        "mode": "generative",
                        "generation": {"max_new_tokens": rng.randint(*max_new_tokens)},
                    },
                )
            )
    return jobs


@dataclass(frozen=True)
class Seen:
    """One observed state of a task: when the watcher saw it (epoch s) and the record's own times."""

    at: float
    state: str
    started_at: float | None = None
    finished_at: float | None = None


class Watcher(threading.Thread):
    """Polls the statuses of every id it was given (`add`) and records each id's state sequence.

    Open ids are polled every `interval_s`; every id, final ones included (a flip is a final state that
    changes later), every `all_every_s`. Redis errors (a restart) are counted and polled through."""

    def __init__(self, service: TaskService, interval_s: float = 0.1, all_every_s: float = 0.5) -> None:
        super().__init__(name="faults-watcher", daemon=True)
        self.service = service
        self.interval_s, self.all_every_s = interval_s, all_every_s
        self.seen: dict[str, list[Seen]] = {}
        self.redis_errors = 0
        self.last_final_at = time.time()  # when a task was last seen reaching a final state
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def add(self, ids: Iterable[str]) -> None:
        with self._lock:
            for task_id in ids:
                self.seen.setdefault(task_id, [])

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        last_all = 0.0
        while not self._halt.wait(self.interval_s):
            everything = time.monotonic() - last_all >= self.all_every_s
            last_all = time.monotonic() if everything else last_all
            try:
                self._poll(self._ids(everything))
            except (redis.RedisError, TaskNotFound):
                self.redis_errors += 1

    def _ids(self, everything: bool) -> list[str]:
        with self._lock:
            return [i for i, seq in self.seen.items() if everything or not seq or seq[-1].state not in FINAL]

    def _poll(self, ids: list[str]) -> None:
        if not ids:
            return
        at = time.time()
        try:
            statuses = self.service.statuses(ids)
        except TaskNotFound:  # a record is gone: find which, and poll the others
            records = self.service.records.get_many(ids)
            present = [i for i, r in zip(ids, records, strict=True) if r and "type" in r]
            for task_id in set(ids) - set(present):
                self._note(task_id, Seen(at, MISSING))
            statuses = self.service.statuses(present) if present else []
        for s in statuses:
            self._note(s.id, Seen(at, s.state.value, _epoch(s.started_at), _epoch(s.finished_at)))

    def _note(self, task_id: str, seen: Seen) -> None:
        with self._lock:
            seq = self.seen.setdefault(task_id, [])
            last = seq[-1] if seq else None
            if (
                last is None
                or last.state != seen.state
                or (seen.state == RUNNING and seen.started_at != last.started_at)
            ):
                seq.append(seen)
                if seen.state in FINAL and (last is None or last.state not in FINAL):
                    self.last_final_at = seen.at

    # -- what it saw ------------------------------------------------------------------------------------

    def last_state(self, task_id: str) -> str | None:
        seq = self.seen.get(task_id) or []
        return seq[-1].state if seq else None

    def open_ids(self) -> list[str]:
        return self._ids(everything=False)

    def flips(self) -> dict[str, list[str]]:
        """Ids whose first final state was followed by any other observation, with their state sequences."""
        out = {}
        with self._lock:
            for task_id, seq in self.seen.items():
                first = next((k for k, s in enumerate(seq) if s.state in FINAL), None)
                if first is not None and any(s.state != seq[first].state for s in seq[first + 1 :]):
                    out[task_id] = [s.state for s in seq]
        return out

    def recovered_at(self, task_id: str, since: float) -> float | None:
        """When a task in flight at `since` was final, or running again (a new start), whichever came first."""
        for s in self.seen.get(task_id, []):
            if s.state in FINAL:
                return max(since, s.finished_at or s.at)
            if s.state == RUNNING and s.started_at is not None and s.started_at > since:
                return s.started_at
        return None

    def first_success_after(self, ids: Iterable[str], since: float) -> float | None:
        times = [
            s.finished_at
            for i in ids
            for s in self.seen.get(i, [])
            if s.state == TaskState.SUCCEEDED.value and s.finished_at and s.finished_at > since
        ]
        return min(times) if times else None

    def history(self, task_id: str, origin: float) -> str:
        return " ".join(f"{s.state}@{s.at - origin:.1f}s" for s in self.seen.get(task_id, []))


class DoneListener(threading.Thread):
    """Collects every `pagedq:done:<id>` publication; an id published twice had its final state written twice."""

    def __init__(self, url: str) -> None:
        super().__init__(name="faults-done-listener", daemon=True)
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.published: dict[str, list[str]] = defaultdict(list)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(DONE_CHANNEL_PREFIX + "*")
                while not self._halt.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message and message["type"] == "pmessage":
                        self.published[message["channel"][len(DONE_CHANNEL_PREFIX) :]].append(message["data"])
            except redis.RedisError:
                time.sleep(0.2)  # Redis restarting: subscribe again
            finally:
                pubsub.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.client.close()

    def twice(self) -> dict[str, list[str]]:
        return {task_id: states for task_id, states in list(self.published.items()) if len(states) > 1}


@dataclass
class Row:
    """One fault's line in the table."""

    fault: str
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0  # not counting the intended poison
    poison_failed: int = 0
    poison_sent: int = 0
    expired: int = 0
    unexpected_expired: int = 0  # expired without a short deadline of the scenario's making
    cancelled: int = 0
    lost: int = 0
    flips: int = 0
    reruns: int = 0  # tasks started more than once (deliveries >= 2)
    first_done_s: float | None = None
    recover_s: float | None = None  # None: nothing was in flight at the fault, or it never came back
    never_recovered: int = 0
    crashed: int = 0  # worker processes that exited by themselves
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


COLUMNS = [
    "fault",
    "submitted",
    "succeeded",
    "failed",
    "poison failed",
    "expired",
    "cancelled",
    "lost",
    "flips",
    "re-run",
    "workers crashed",
    "first done after (s)",
    "in flight back (s)",
    "wall (s)",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for r in rows:
        poison = f"{r.poison_failed}/{r.poison_sent}" if r.poison_sent else "-"
        recover = _seconds(r.recover_s)
        if r.never_recovered:
            recover = f"never: {r.never_recovered} (the rest {recover})"
        cells = [
            r.fault,
            r.submitted,
            r.succeeded,
            r.failed,
            poison,
            r.expired,
            r.cancelled,
            r.lost,
            r.flips,
            r.reruns,
            r.crashed,
            _seconds(r.first_done_s),
            recover,
            f"{r.wall_s:.1f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _epoch(value: Any) -> float | None:
    return value.timestamp() if value is not None else None
