"""The reconciler: task records are the truth, the broker is transport. Runs in every worker (one at a time).

Each round (every `reconcile_interval_s`, under a short Redis lock so one worker does it):

1. **Dead workers.** A worker in `pagedq:workers` whose lease expired: each task it claimed and did not
   finish is released (its record says queued again, `requeues` + 1) and its message is put back at the
   head of its queue from the broker's unacked hash (kombu's own restore), or sent again from the record
   if the broker no longer holds it.
2. **Orphaned deliveries.** Messages in kombu's unacked hash older than the lease that no live worker
   holds (prefetched by a worker that died before starting them) go back to their queue at once, instead
   of after the visibility timeout.
3. **Lost messages.** kombu's Redis transport pops a message before it records it as unacked, so a worker
   stop in between loses it (kombu #305, #1836). When there are more open tasks than messages, the queues
   and the unacked hash are scanned; a task with no message anywhere in two rounds `lost_message_grace_s`
   apart, no final state and no live owner is sent again under the same id.

Re-running is always safe: `TaskRecords.claim` skips a task that is final or owned by a live worker.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from pagedq.shared.celery_config import QUEUES, TASK_NAMES, celery_priority, redis_queue_keys
from pagedq.shared.models import TaskType
from pagedq.shared.records import CLAIMED_PREFIX, OPEN_KEY, WORKERS_KEY, TaskRecords, task_key
from pagedq.worker.lease import HELD_PREFIX

log = logging.getLogger(__name__)

LOCK_KEY = "pagedq:reconciler"
#: kombu's Redis transport keys (its defaults; Celery does not change them).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: Most open tasks inspected per round when looking for lost messages.
MAX_CANDIDATES = 20_000


@dataclass
class RoundReport:
    dead_workers: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    restored_tags: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, app: Celery, records: TaskRecords, worker_id: str, lease_ttl_s: float,
                 interval_s: float, lost_grace_s: float) -> None:
        self.app = app
        self.records = records
        self.redis: redis.Redis = records.redis
        self.worker_id = worker_id
        self.lease_ttl_s = lease_ttl_s
        self.interval_s = interval_s
        self.lost_grace_s = lost_grace_s
        self._queues = set(QUEUES.values())
        self._suspects: dict[str, float] = {}  # task id -> when first seen without a message
        self._own_suspects: set[str] = set()  # claimed by this worker, not in flight here at the last round

    def run_once(self) -> RoundReport | None:
        """One round, if this worker holds the lock (None otherwise)."""
        if not self.redis.set(LOCK_KEY, self.worker_id, px=int(self.interval_s * 1000), nx=True):
            return None
        report = RoundReport()
        workers: list[str] = self.redis.zrange(WORKERS_KEY, 0, -1)  # type: ignore[assignment]
        live = set(self.records.live_workers())  # read once: every step of the round decides on the same view
        self._recover_dead_workers([w for w in workers if w not in live], report)
        self._restore_orphans(live, report)
        self._resend_lost(live, report)
        if report.released or report.restored_tags or report.resent:
            log.warning("reconciler: dead workers %s, released %d tasks, restored %d messages, re-sent %s",
                        report.dead_workers, len(report.released), len(report.restored_tags), report.resent)
        return report

    # -- 0. this worker's own dropped tasks ---------------------------------------------------------------

    def recover_own(self, inflight: set[str]) -> list[str]:
        """Hand back what this worker claimed but no task thread of it runs any more (its final write failed
        while Redis was down, or a thread died): seen so in two rounds, it is released and sent again."""
        claimed = set(self.records.claimed_by(self.worker_id))
        dropped = {t for t in claimed if t not in inflight}
        confirmed = sorted(dropped & self._own_suspects)
        self._own_suspects = dropped - set(confirmed)
        report = RoundReport()
        for task_id in confirmed:
            if self.records.release(task_id, self.worker_id):
                self._resend(task_id, report)
        if report.resent:
            log.warning("reconciler: re-sent %d tasks this worker had dropped: %s", len(report.resent), report.resent)
        return report.resent

    # -- 1. dead workers ----------------------------------------------------------------------------------

    def _recover_dead_workers(self, dead: list[str], report: RoundReport) -> None:
        for worker in dead:
            report.dead_workers.append(worker)
            for task_id, tag in self.records.claimed_by(worker).items():
                if self.records.release(task_id, worker):
                    report.released.append(task_id)
                    # items of one batch message share its tag: restored once, with all of them
                    if tag not in report.restored_tags and not self._restore_tag(tag, report):
                        self._resend(task_id, report)
            self.redis.delete(CLAIMED_PREFIX + worker)
            self.redis.zrem(WORKERS_KEY, worker)

    # -- 2. orphaned deliveries ---------------------------------------------------------------------------

    def _restore_orphans(self, live: set[str], report: RoundReport) -> None:
        ceiling = time.time() - self.lease_ttl_s
        tags: list[str] = self.redis.zrangebyscore(UNACKED_INDEX_KEY, "-inf", ceiling)  # type: ignore[assignment]
        if not tags:
            return
        held = self._held_by(live)
        for tag in tags:
            if tag not in held and self._is_ours(tag):
                self._restore_tag(tag, report)

    def _held_by(self, live: set[str]) -> set[str]:
        with self.redis.pipeline(transaction=False) as pipe:
            for w in live:
                pipe.smembers(HELD_PREFIX + w)
            return {tag for tags in pipe.execute() for tag in tags}

    def _is_ours(self, tag: str) -> bool:
        raw = self.redis.hget(UNACKED_KEY, tag)
        if raw is None:
            return False
        try:
            _, _, routing_key = json.loads(raw)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False
        return routing_key in self._queues

    def _restore_tag(self, tag: str, report: RoundReport) -> bool:
        """Put an unacked message back at the head of its queue (kombu's restore); False if it is gone."""
        if not self.redis.hexists(UNACKED_KEY, tag):
            return False
        with self.app.connection_for_write() as conn:
            conn.default_channel.qos.restore_by_tag(tag, leftmost=True)
        report.restored_tags.append(tag)
        return True

    # -- 3. lost messages ---------------------------------------------------------------------------------

    def _resend_lost(self, live: set[str], report: RoundReport) -> None:
        if not self._more_open_than_messages():
            self._suspects.clear()
            return
        now = time.time()
        candidates: list[str] = self.redis.zrangebyscore(  # type: ignore[assignment]
            OPEN_KEY, "-inf", now - self.lost_grace_s, start=0, num=MAX_CANDIDATES)
        if not candidates:  # every open task is younger than the grace: nothing to scan the queues for
            self._suspects.clear()
            return
        missing = set(candidates) - self._ids_with_messages()
        missing -= self._final_or_running_on(live, missing)
        self._suspects = {t: self._suspects.get(t, now) for t in missing}
        for task_id, since in list(self._suspects.items()):
            if now - since >= self.lost_grace_s:
                del self._suspects[task_id]
                self._resend(task_id, report)

    def _more_open_than_messages(self) -> bool:
        """A cheap gate before a scan. A batch message carries many open tasks, so under a backlog of bulks
        this is true and the scan (O(messages queued)) runs once per round while tasks older than the grace
        are open."""
        keys = [k for q in QUEUES.values() for k in redis_queue_keys(q)]
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(OPEN_KEY)
            for key in keys:
                pipe.llen(key)
            pipe.hlen(UNACKED_KEY)
            counts = pipe.execute()
        return bool(counts[0] > sum(counts[1:]))

    def _ids_with_messages(self) -> set[str]:
        keys = [k for q in QUEUES.values() for k in redis_queue_keys(q)]
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.lrange(key, 0, -1)
            pipe.hvals(UNACKED_KEY)
            *queued, unacked = pipe.execute()
        ids = {i for items in queued for raw in items for i in _message_ids(raw)}
        return ids | {i for raw in unacked for i in _message_ids(raw, wrapped=True)}

    def _final_or_running_on(self, live: set[str], task_ids: Iterable[str]) -> set[str]:
        ids = list(task_ids)
        if not ids:
            return set()
        with self.redis.pipeline(transaction=False) as pipe:
            for t in ids:
                pipe.hmget(task_key(t), ["worker", "state"])
            rows = pipe.execute()
        return {t for t, (worker, state) in zip(ids, rows, strict=True) if state or worker in live}

    def _resend(self, task_id: str, report: RoundReport) -> None:
        """Send a task's message again from its record, under the same id (claim makes it idempotent)."""
        record = self.records.get(task_id)
        if record is None or record.get("state") or not record.get("message"):
            return
        task_type = TaskType(record["type"])
        self.app.send_task(
            TASK_NAMES[task_type], args=[json.loads(record["message"])], task_id=task_id,
            queue=QUEUES[task_type], priority=celery_priority(int(record.get("priority", 0))),
            argsrepr=f"<{task_type.value} re-sent by the reconciler>", kwargsrepr="{}",
        )
        report.resent.append(task_id)


def _message_ids(raw: Any, wrapped: bool = False) -> list[str]:
    """The task ids a raw kombu Redis message carries (`wrapped`: an unacked entry [message, ex, rk]): its
    Celery task id, and for a batch message the id of every item in its body."""
    try:
        data = json.loads(raw)
        message = data[0] if wrapped else data
        headers = message["headers"]
        ids = [str(headers["id"])]
        if str(headers.get("task", "")).endswith(".batch"):
            [body], _, _ = json.loads(base64.b64decode(message["body"]))
            ids += [str(item["id"]) for item in body["items"]]
        return ids
    except (ValueError, TypeError, KeyError, IndexError):
        return []
