"""Task records in Redis: what was submitted, when, and whether a user asked to cancel it.

Celery reports PENDING for any id it has never seen, so the producer writes a record at submission and
an id without one is a 404. The worker adds `started_at`; the Celery result backend holds the outcome.
Records expire with the results (`PAGEDQ_RESULT_TTL_S`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import redis
from redis.typing import EncodableT

from shared.models import TaskType

KEY_PREFIX = "pagedq:task:"


def now() -> datetime:
    return datetime.now(UTC)


class NewRecord(NamedTuple):
    task_id: str
    task: TaskType
    model: str
    priority: int
    deadline: datetime | None


class TaskRecords:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    @classmethod
    def from_url(cls, url: str, ttl_s: int) -> TaskRecords:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=5), ttl_s)

    def _key(self, task_id: str) -> str:
        return KEY_PREFIX + task_id

    def create(self, task_id: str, task: TaskType, model: str, priority: int, deadline: datetime | None) -> None:
        self.create_many([NewRecord(task_id, task, model, priority, deadline)])

    def create_many(self, records: Sequence[NewRecord]) -> None:
        """Write many records in one round trip (a bulk submission)."""
        created = now().isoformat()
        with self.redis.pipeline(transaction=False) as pipe:
            for r in records:
                fields: dict[EncodableT, EncodableT] = {"type": r.task.value, "model": r.model,
                                                        "priority": r.priority, "created_at": created}
                if r.deadline is not None:
                    fields["deadline"] = r.deadline.isoformat()
                pipe.hset(self._key(r.task_id), mapping=fields)
                pipe.expire(self._key(r.task_id), self.ttl_s)
            pipe.execute()

    def get(self, task_id: str) -> dict[str, str] | None:
        data: dict[str, str] = self.redis.hgetall(self._key(task_id))  # type: ignore[assignment]
        return data or None

    def get_many(self, task_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """Records in the order of `task_ids` (None where there is none), in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(self._key(task_id))
            return [data or None for data in pipe.execute()]

    def delete(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            self.redis.delete(*[self._key(t) for t in task_ids])

    def mark(self, task_id: str, **fields: str) -> None:
        """Set fields on an existing record (started_at, worker, cancel_requested...)."""
        key = self._key(task_id)
        mapping: dict[EncodableT, EncodableT] = {k: v for k, v in fields.items()}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def cancel_requested(self, task_id: str) -> bool:
        return bool(self.redis.hget(self._key(task_id), "cancel_requested"))
