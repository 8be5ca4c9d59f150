"""Task records in Redis: the source of truth for every task's state. The broker is only transport.

One hash per task, `pagedq:task:<id>`, written by the producer at submission and changed afterwards only
by the atomic scripts below (one Redis round trip each, no read-modify-write races between processes):

    fields            written by        meaning
    type model priority created_at deadline deadline_ts message notify
                      create_many       what was submitted; `message` is the Celery body, for re-sending;
                                        `notify` the submitter's reply channel
    cancel_requested  request_cancel    a user asked to cancel
    worker started_at claim             the worker process that runs it now (cleared by release)
    deliveries        claim             how many times a worker started it
    requeues          release           how many times it was handed back (worker stop or death)
    state result error finished_at
                      finalize          the final state: written ONCE; every later finalize returns it

Invariants:
- a task reaches one final state, once, and keeps it: `finalize` writes only if no `state` exists;
- every transition is a script on one key, so a worker, a producer and the reconciler never interleave;
- `pagedq:open` holds exactly the ids that have a record and no final state (the reconciler's work list);
- finalize publishes the final fields (state, result, error, finished_at; JSON) on `pagedq:done:<id>`, so
  waiters learn of it, and what it is, without polling or a second read; and, with the task's id, on the
  record's `notify` channel (one list per call and channel), where its submitter already listens.
Records expire with the results (`PAGEDQ_RESULT_TTL_S`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

import redis
from pydantic_core import PydanticSerializationError, to_json
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.typing import EncodableT

from pagedq.shared.models import TaskState, TaskType

KEY_PREFIX = "pagedq:task:"
#: Ids with a record and no final state, scored by submission time (epoch seconds).
OPEN_KEY = "pagedq:open"
#: Channel prefix on which `finalize` publishes a task's final state.
DONE_CHANNEL_PREFIX = "pagedq:done:"
#: Channel prefix of a producer's reply channel (producer/replies.py): a record's `notify` field names one, and
#: finalize publishes the task's final fields there too, as a list per call (with the task `id`).
REPLY_CHANNEL_PREFIX = "pagedq:reply:"
#: Per worker process: the ids it claimed, id -> delivery tag (what the reconciler hands back if it dies).
CLAIMED_PREFIX = "pagedq:claimed:"


#: A worker's retries of a command on a connection error, backing off up to 1 s (about 8 s in all).
WORKER_RETRIES = 10


def now() -> datetime:
    return datetime.now(UTC)


def task_key(task_id: str) -> str:
    return KEY_PREFIX + task_id


def done_channel(task_id: str) -> str:
    return DONE_CHANNEL_PREFIX + task_id


#: Worker leases (worker/lease.py writes them): a live worker process renews `LEASE_PREFIX + <worker id>`
#: (JSON: hostname, pid, ready) every heartbeat; `WORKERS_KEY` lists every worker process to watch.
LEASE_PREFIX = "pagedq:lease:"
WORKERS_KEY = "pagedq:workers"

#: A task's generated text as it is produced (a Redis stream; worker/streaming.py writes it).
STREAM_PREFIX = "pagedq:stream:"


def stream_key(task_id: str) -> str:
    return STREAM_PREFIX + task_id


#: The record fields a task's status is made of (producer/status.py).
STATUS_FIELDS = ("type", "model", "priority", "created_at", "deadline", "worker", "started_at", "state", "result",
                 "error", "finished_at")


class NewRecord(NamedTuple):
    task_id: str
    task: TaskType
    model: str
    priority: int
    deadline: datetime | None
    message: dict[str, Any] | None = None  # the Celery task body, kept to re-send a lost message


class Outcome(NamedTuple):
    """A final state to write: `result` (JSON-able) for succeeded, `error` {type, message} otherwise."""

    task_id: str
    state: TaskState
    result: Any = None
    error: dict[str, str] | None = None


class Claim(StrEnum):
    """What `claim` decided for one delivery of a task."""

    RUN = "run"  # this worker now owns the task: run it
    FINAL = "final"  # already final (redelivered after it finished, or cancelled/expired first): skip
    OWNED = "owned"  # another live worker runs it already: this delivery is a duplicate, skip
    MINE = "mine"  # this worker claimed it before: a duplicate if it runs it now, else (a retried claim whose
    #                reply was lost, or work this process dropped) it is this worker's to run
    CANCELLED = "cancelled"  # a cancel was asked before it started: finalized as cancelled now
    EXPIRED = "expired"  # its deadline passed before it started: finalized as expired now
    MISSING = "missing"  # no record (never submitted through pagedq, or expired): skip


# Claim the tasks of one delivery, each on its own (one call for all of a message's items: a pipeline of one
# call per item cost a bulk's worker ~25 us of Python per item, and Redis a command per item).
# KEYS[1] open set, KEYS[2] claimed hash of this worker, KEYS[3..] the tasks
# ARGV: worker, lease prefix, now (epoch s), started_at (iso), delivery tag, ttl s, key prefix, done prefix
_CLAIM = """
local function finalize(key, id, state, etype, message, notify)
  local err = cjson.encode({type=etype, message=message})
  redis.call('HSET', key, 'state', state, 'finished_at', ARGV[4], 'error', err)
  redis.call('ZREM', KEYS[1], id)
  redis.call('PUBLISH', ARGV[8] .. id,
             cjson.encode({state=state, result='', error=err, finished_at=ARGV[4], started_at=''}))
  if notify then
    redis.call('PUBLISH', notify, cjson.encode({{id=id, state=state, result='', error=err, finished_at=ARGV[4],
                                                 started_at=''}}))
  end
  return state
end
local function claim(key)
  local id = string.sub(key, #ARGV[7] + 1)
  local kind, state, cancel, deadline, owner, deliveries, notify = unpack(redis.call('HMGET', key,
    'type', 'state', 'cancel_requested', 'deadline_ts', 'worker', 'deliveries', 'notify'))
  -- every record has a type; EXISTS only for a key with none of these fields
  if not (kind or state or cancel or deadline or owner or deliveries or notify)
     and redis.call('EXISTS', key) == 0 then return 'missing' end
  if state then return 'final' end
  if cancel then
    return finalize(key, id, 'cancelled', 'TaskCancelled', 'cancelled before it started', notify)
  end
  deadline = tonumber(deadline or '')
  if deadline and tonumber(ARGV[3]) >= deadline then
    return finalize(key, id, 'expired', 'DeadlineExceeded', 'the deadline passed while the task was queued', notify)
  end
  if owner == ARGV[1] then return 'mine' end
  if owner and redis.call('EXISTS', ARGV[2] .. owner) == 1 then return 'owned' end
  redis.call('HSET', key, 'worker', ARGV[1], 'started_at', ARGV[4],
             'deliveries', (tonumber(deliveries) or 0) + 1)
  redis.call('HSET', KEYS[2], id, ARGV[5])
  return 'run'
end
local out = {}
for i = 3, #KEYS do out[i - 2] = claim(KEYS[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[6])
return out
"""

# Write the final states of many tasks, each only if it has none. KEYS[1] open set, KEYS[2..] the tasks;
# ARGV: finished_at, claimed prefix, done prefix, key prefix, then one JSON array of [state, result json, error
# json] per task (strings; '' for none).
# Returns per task the final state that holds afterwards (this one, or the one written first; '' no record).
# Per task one read (HMGET) and one write of the record (EXISTS only for a key with none of the fields read).
_FINALIZE = """
local out, replies, rows = {}, {}, cjson.decode(ARGV[5])
for i = 2, #KEYS do
  local key = KEYS[i]
  local state, result, err = unpack(rows[i - 1])
  local id = string.sub(key, #ARGV[4] + 1)
  local kind, existing, owner, started, notify = unpack(redis.call('HMGET', key,
    'type', 'state', 'worker', 'started_at', 'notify'))
  if not (kind or existing or owner or started or notify) and redis.call('EXISTS', key) == 0 then
    out[i - 1] = ''
  elseif existing then
    out[i - 1] = existing
  else
    local fields = {'state', state, 'finished_at', ARGV[1]}
    if result ~= '' then table.insert(fields, 'result'); table.insert(fields, result) end
    if err ~= '' then table.insert(fields, 'error'); table.insert(fields, err) end
    redis.call('HSET', key, unpack(fields))
    redis.call('ZREM', KEYS[1], id)
    if owner then redis.call('HDEL', ARGV[2] .. owner, id) end
    local notice = {state=state, result=result, error=err, finished_at=ARGV[1], started_at=started or ''}
    redis.call('PUBLISH', ARGV[3] .. id, cjson.encode(notice))
    if notify then
      notice.id = id
      replies[notify] = replies[notify] or {}
      table.insert(replies[notify], notice)
    end
    out[i - 1] = state
  end
end
for channel, notices in pairs(replies) do redis.call('PUBLISH', channel, cjson.encode(notices)) end
return out
"""

# KEYS[1]: the open set, KEYS[2..]: new task records. ARGV[1]: ttl (s), ARGV[2]: created_at (ISO), ARGV[3]: its
# epoch s, ARGV[4]: notify channel ('' for none); ARGV[5]: one JSON array of 7 strings per record: id, type,
# model, priority, deadline (ISO, '' for none) and its epoch s, message (JSON, '' for none). Writes each record,
# its expiry and its entry in the open set: what a pipeline of three commands per record did, in one command.
_CREATE = """
local ttl, created, score, notify = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local records = cjson.decode(ARGV[5])
for i = 2, #KEYS do
  local r = records[i - 1]
  local fields = {'type', r[2], 'model', r[3], 'priority', r[4], 'created_at', created}
  if r[5] ~= '' then
    table.insert(fields, 'deadline'); table.insert(fields, r[5])
    table.insert(fields, 'deadline_ts'); table.insert(fields, r[6])
  end
  if r[7] ~= '' then table.insert(fields, 'message'); table.insert(fields, r[7]) end
  if notify ~= '' then table.insert(fields, 'notify'); table.insert(fields, notify) end
  redis.call('HSET', KEYS[i], unpack(fields))
  redis.call('EXPIRE', KEYS[i], ttl)
  redis.call('ZADD', KEYS[1], score, r[1])
end
return #KEYS - 1
"""

#: records per `_CREATE` call: a script blocks Redis while it runs (~1 ms per 1,000 records here)
CREATE_CHUNK = 2048
#: characters of messages per `_CREATE` call, at most (a single longer message travels alone)
CREATE_CHUNK_CHARS = 16_000_000

# KEYS: tasks; ARGV[1]: now (epoch s). The positions (1-based) of the tasks whose status can no longer be
# queued or running: final, past their deadline, or without a record. A waiter's fallback (one command for
# thousands of ids, no record read, nothing for the caller to parse per id).
_SETTLED = """
local out = {}
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local state, deadline = unpack(redis.call('HMGET', key, 'state', 'deadline_ts'))
  if state or (deadline and now >= tonumber(deadline)) or redis.call('EXISTS', key) == 0 then
    out[#out + 1] = i
  end
end
return out
"""

# KEYS[1] task; ARGV: worker, id, claimed prefix. Hand a task back (worker stop or death): not final, and
# still owned by `worker`. Returns 1 if released.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HDEL', ARGV[3] .. ARGV[1], ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'state') == 1 then return 0 end
redis.call('HDEL', KEYS[1], 'worker', 'started_at')
redis.call('HINCRBY', KEYS[1], 'requeues', 1)
return 1
"""


class TaskRecords:
    """Reads and atomic transitions of task records (see the module docstring)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)
        self._finalize = client.register_script(_FINALIZE)
        self._release = client.register_script(_RELEASE)
        self._settled = client.register_script(_SETTLED)
        self._create = client.register_script(_CREATE)

    @classmethod
    def from_url(cls, url: str, ttl_s: int, retries: int = 1) -> TaskRecords:
        """`retries`: how many times a command is retried on a connection error, backing off up to 1 s. A
        worker uses `WORKER_RETRIES` to ride out a Redis restart of a few seconds (every script here is safe to
        retry: finalize and release are idempotent, a retried claim answers `mine`); a producer fails fast."""
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5, health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client, ttl_s)

    # -- producer -----------------------------------------------------------------------------------------

    def create(self, task_id: str, task: TaskType, model: str, priority: int, deadline: datetime | None,
               message: dict[str, Any] | None = None) -> None:
        self.create_many([NewRecord(task_id, task, model, priority, deadline, message)])

    def create_many(self, records: Sequence[NewRecord], notify: str | None = None) -> datetime:
        """Write many records (and their entries in the open set) in one round trip; `notify`: the submitter's
        reply channel. Returns their `created_at`."""
        created = now()
        head: list[EncodableT] = [self.ttl_s, created.isoformat(), repr(created.timestamp()), notify or ""]
        # every record's fields in ONE argument per call (JSON, decoded by the script): an argument each cost
        # redis-py ~2.5 us of Python to encode, 18 us a record; pydantic-core's encoder is ~8x json's. A call
        # holds at most CREATE_CHUNK records and CREATE_CHUNK_CHARS characters of messages (long QA contexts:
        # Redis refuses a string over 512 MB, and a script blocks it while it runs)
        chunks: list[tuple[list[str], list[list[str]]]] = []
        keys: list[str] = []
        rows: list[list[str]] = []
        size = 0
        for r in records:
            message = "" if r.message is None else _json(r.message)
            if rows and (len(rows) >= CREATE_CHUNK or size + len(message) > CREATE_CHUNK_CHARS):
                chunks.append((keys, rows))
                keys, rows, size = [], [], 0
            keys.append(task_key(r.task_id))
            rows.append([r.task_id, r.task.value, r.model, str(r.priority),
                         "" if r.deadline is None else r.deadline.isoformat(),
                         "" if r.deadline is None else repr(r.deadline.timestamp()), message])
            size += len(message)
        if rows:
            chunks.append((keys, rows))
        calls = [([OPEN_KEY, *keys], [*head, _json(rows)]) for keys, rows in chunks]
        if len(calls) == 1:  # one EVALSHA: a pipeline would first ask SCRIPT EXISTS, a round trip of its own
            self._create(keys=calls[0][0], args=calls[0][1])
        elif calls:
            with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    self._create(keys=keys, args=args, client=pipe)
                pipe.execute()
        return created

    def delete(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(*[task_key(t) for t in task_ids])
                pipe.zrem(OPEN_KEY, *task_ids)
                pipe.execute()

    def request_cancel(self, task_id: str) -> None:
        self.redis.hset(task_key(task_id), "cancel_requested", "1")

    # -- reads --------------------------------------------------------------------------------------------

    def get(self, task_id: str) -> dict[str, str] | None:
        data: dict[str, str] = self.redis.hgetall(task_key(task_id))  # type: ignore[assignment]
        return data or None

    def get_many(self, task_ids: Sequence[str], fields: Sequence[str] | None = None) -> list[dict[str, str] | None]:
        """Records in the order of `task_ids` (None where there is none), in one round trip; only `fields`
        when given (a status needs `STATUS_FIELDS`, not the message it was sent with)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                if fields is None:
                    pipe.hgetall(task_key(task_id))
                else:
                    pipe.hmget(task_key(task_id), fields)
            replies = pipe.execute()
        if fields is None:
            return [data or None for data in replies]
        return [{f: v for f, v in zip(fields, values, strict=True) if v is not None} or None for values in replies]

    def settled(self, task_ids: Sequence[str], chunk: int = 5000) -> list[str]:
        """The ids among `task_ids` whose status is final, or must be read to be made final (past their
        deadline, or no record): one command per `chunk` ids."""
        found: list[str] = []
        for start in range(0, len(task_ids), chunk):
            part = task_ids[start : start + chunk]
            positions = self._settled(keys=[task_key(t) for t in part], args=[repr(now().timestamp())])
            found += [part[i - 1] for i in positions]
        return found

    # -- transitions --------------------------------------------------------------------------------------

    def claim(self, task_id: str, worker: str, delivery_tag: str, lease_prefix: str) -> Claim:
        """Start a delivery of `task_id` on `worker` (see `Claim` for the outcomes)."""
        return self.claim_many([task_id], worker, delivery_tag, lease_prefix)[0]

    def claim_many(self, task_ids: Sequence[str], worker: str, delivery_tag: str, lease_prefix: str,
                   claimed_ttl_s: int = 7 * 24 * 3600) -> list[Claim]:
        """`claim` for the items of one message, in one call (each item decided on its own)."""
        if not task_ids:
            return []
        at = now()
        keys = [OPEN_KEY, CLAIMED_PREFIX + worker, *map(task_key, task_ids)]
        args: list[EncodableT] = [worker, lease_prefix, repr(at.timestamp()), at.isoformat(), delivery_tag,
                                  claimed_ttl_s, KEY_PREFIX, DONE_CHANNEL_PREFIX]
        return [Claim(outcome) for outcome in self._claim(keys=keys, args=args)]

    def finalize(self, task_id: str, state: TaskState, result: Any = None, error: dict[str, str] | None = None,
                 ) -> TaskState | None:
        """Write the final state unless one exists. Returns the state that holds now (None: no record)."""
        return self.finalize_many([Outcome(task_id, state, result, error)])[0]

    def finalize_many(self, outcomes: Sequence[Outcome]) -> list[TaskState | None]:
        """`finalize` for many tasks in one call (each written only if it has no final state yet)."""
        if not outcomes:
            return []
        keys: list[Any] = [OPEN_KEY]
        rows = []
        for o in outcomes:
            if not o.state.is_final:
                raise ValueError(f"{o.state} is not a final state")
            keys.append(task_key(o.task_id))
            rows.append([o.state.value, "" if o.result is None else _json(o.result),
                         "" if o.error is None else _json(o.error)])
        # the rows in one argument, as `create_many`'s records
        args = [now().isoformat(), CLAIMED_PREFIX, DONE_CHANNEL_PREFIX, KEY_PREFIX, _json(rows)]
        return [TaskState(state) if state else None for state in self._finalize(keys=keys, args=args)]

    def release(self, task_id: str, worker: str) -> bool:
        """Hand a task that `worker` claimed back to the queue state (not final). True if it was released."""
        return bool(self._release(keys=[task_key(task_id)], args=[worker, task_id, CLAIMED_PREFIX]))

    def live_workers(self) -> dict[str, dict[str, object]]:
        """Worker id -> its lease (hostname, pid, ready: the engine is running) for every live lease."""
        workers: list[str] = self.redis.zrange(WORKERS_KEY, 0, -1)  # type: ignore[assignment]
        if not workers:
            return {}
        leases = self.redis.mget([LEASE_PREFIX + w for w in workers])
        live = {}
        for worker, raw in zip(workers, leases, strict=True):
            if raw:
                try:
                    live[worker] = json.loads(raw)  # type: ignore[arg-type]
                except ValueError:
                    live[worker] = {}
        return live

    def claimed_by(self, worker: str) -> dict[str, str]:
        """The ids `worker` claimed and has not finished, with the delivery tag of each."""
        return self.redis.hgetall(CLAIMED_PREFIX + worker)  # type: ignore[return-value]


def _json(value: Any) -> str:
    """JSON as `json.dumps` reads it back (NaN and infinities as its constants), ~8x faster (pydantic-core's
    encoder, which writes UTF-8: text that is not valid Unicode, a lone surrogate, is escaped by `json.dumps`)."""
    try:
        return to_json(value, inf_nan_mode="constants").decode()
    except PydanticSerializationError:
        return json.dumps(value)
