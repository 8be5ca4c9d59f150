"""Faults benchmark from the handbook's benchmarks.md: N tasks through the real stack under each fault.

The stack is scripts/stack.py's: a private redis-server (AOF on), Celery worker processes over the tiny
random-weight demo models (`python -m pagedq.worker.demo.models`), the HTTP API. Each fault runs a mixed workload
(classify, translate, generative QA whose length is its max_new_tokens) submitted with `submit_bulk` in
chunks plus single `submit`s: 60% before the fault, 40% from the moment of the fault on (retried while
Redis is down; a few of them are cancelled at once). The fault is injected once some tasks are final and
some are running. A worker that exits by itself is started again, as compose.yaml's `restart:
unless-stopped` would (--no-restart-policy: not), and counted under "workers crashed". Faults:

  worker-sigkill   SIGKILL the worker running the most tasks, start a new one
  worker-sigterm   SIGTERM it instead (warm shutdown: a drain of --drain-s, the rest handed back), new one
  kills-in-a-row   --kills SIGKILLs --kill-gap-s apart, each followed by a new worker
  redis-sigterm    Redis SIGTERM, down --redis-down-s, restarted on the same port
  redis-sigkill    the same with SIGKILL (AOF on: what Redis acknowledged must survive)
  duplicate        the stored message of running tasks sent again under the same id
  poison           raw messages the producer would refuse (a lone surrogate, temperature 1e-300,
                   malformed requests) sent among the good ones: only they may fail
  deadline-kill    the first 60% get timeout_s=--deadline-s; every worker is SIGKILLed; workers come back
                   after the deadlines: those tasks end `expired` and stay so

A watcher polls `TaskService.statuses` (open ids every 0.1 s, all every 0.5 s) and records every id's
states. Per fault: submitted, succeeded, failed (not counting poison), poison failed, expired, cancelled,
lost (not final when no task has finished for --stall-s), flips (a final state that changed later, seen by
the watcher or published twice on pagedq:done:<id>), re-run (deliveries >= 2), workers crashed, first done
after (s): the first success after the fault, in flight back (s): until every task running at the fault
was final or running again, wall (s): first submission to last final state. Short leases (LEASE_ENV) make
recovery quick; notes under the table say what each fault did and saw, then every task that went wrong is
described (its states, its record, the worker log lines naming it).

Run: `python bench/faults.py` (1,000 tasks per fault), `--quick` (150), `--only poison,redis-sigkill`.
Plots lost, flips and recovery time per fault (bench/plots.py) to bench/plots/faults.png (`--plot`).
Ends with one line: faults_lost=.. faults_flips=.. faults_unexpected_failures=.. faults_max_recover_s=..
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import redis
from kombu.exceptions import OperationalError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # scripts/ is not an installed package

import plots  # noqa: E402
from _faults_support import FINAL, DoneListener, Job, Row, Watcher, mixed_jobs, table  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from pagedq.producer.errors import TaskAlreadyFinished  # noqa: E402
from pagedq.producer.service import TaskService  # noqa: E402
from pagedq.shared.celery_config import QUEUES, TASK_NAMES, make_celery, redis_queue_keys  # noqa: E402
from pagedq.shared.errors import PagedqError  # noqa: E402
from pagedq.shared.models import TaskType  # noqa: E402
from pagedq.shared.records import OPEN_KEY, task_key  # noqa: E402
from pagedq.worker.demo.models import build_demo_models  # noqa: E402
from scripts.stack import Stack  # noqa: E402

#: short leases so that a dead worker's tasks are back within seconds (as in tests/worker/test_reliability.py)
LEASE_ENV = {
    "PAGEDQ_LEASE_TTL_S": "3",
    "PAGEDQ_HEARTBEAT_INTERVAL_S": "0.5",
    "PAGEDQ_RECONCILE_INTERVAL_S": "1",
    "PAGEDQ_LOST_MESSAGE_GRACE_S": "2",
}
BEFORE_FAULT = 0.6  # share of the tasks submitted before the fault
SINGLE_EVERY = 20  # every 20th task is submitted alone (`submit`), the rest in bulks
POISONS: list[tuple[str, TaskType, dict]] = [
    ("surrogate", TaskType.CLASSIFY, {"text": "bad \ud800 text"}),
    ("surrogate", TaskType.TRANSLATE, {"text": "\ud800"}),
    ("surrogate", TaskType.QA, {"question": "who \ud800?", "context": "Ada wrote it.", "mode": "generative"}),
    ("temperature", TaskType.TRANSLATE, {"text": "hello", "generation": {"do_sample": True, "temperature": 1e-300}}),
    ("temperature", TaskType.QA, {"question": "who?", "context": "Ada wrote it.", "mode": "generative",
                                  "generation": {"do_sample": True, "temperature": 1e-300}}),
    ("malformed", TaskType.CLASSIFY, {"txet": 3}),
    ("malformed", TaskType.TRANSLATE, {"text": 42}),
    ("malformed", TaskType.QA, {"question": "no context"}),
]  # fmt: skip


@dataclass
class Run:
    """One fault's bookkeeping; `in_flight` maps each id running at a fault to that fault's time."""

    name: str
    watcher: Watcher
    done: DoneListener
    rest: list[Job]
    started: float = field(default_factory=time.time)
    ids: list[str] = field(default_factory=list)
    poison: dict[str, str] = field(default_factory=dict)  # id -> kind
    may_expire: set[str] = field(default_factory=set)
    expire_by: float = 0.0  # when the last short deadline passes
    in_flight: dict[str, float] = field(default_factory=dict)
    t_fault: float | None = None
    submitter: threading.Thread | None = None
    checks: list[Callable[[], str]] = field(default_factory=list)  # notes computed once all is final
    crashed: int = 0  # worker processes that exited by themselves
    over: threading.Event = field(default_factory=threading.Event)
    notes: list[str] = field(default_factory=list)


class Bench:
    """The stack (reused from fault to fault while it is clean, else a fresh one) and the clients faults use."""

    def __init__(self, args: argparse.Namespace, registry: Path, log_root: Path) -> None:
        self.args, self.registry, self.log_root = args, registry, log_root
        self.env = {**LEASE_ENV, "PAGEDQ_DRAIN_TIMEOUT_S": str(args.drain_s)}
        self.stack: Stack | None = None
        self.stacks = 0
        self._starting = threading.Lock()

    def fresh_stack(self) -> None:
        self.close()
        self.stacks += 1
        self.log_dir = self.log_root / f"stack{self.stacks}"
        self.stack = Stack(
            registry_path=self.registry,
            log_dir=self.log_dir,
            worker_concurrency=self.args.worker_threads,
            extra_env=self.env,
        ).start(flower=False)
        self.service = TaskService(self.stack.settings())
        self.redis = redis.Redis.from_url(self.stack.redis_url or "", decode_responses=True)
        self.app = make_celery(self.stack.settings(), main="pagedq-faults")
        self.ensure_workers()

    def reset(self) -> None:
        """A clean stack with --workers ready workers: the old one if nothing is open or queued, else fresh."""
        if self.stack is None or not self.is_clean():
            self.fresh_stack()
        else:
            self.ensure_workers()

    def is_clean(self) -> bool:
        try:
            keys = [k for q in QUEUES.values() for k in redis_queue_keys(q)]
            return not self.redis.zcard(OPEN_KEY) and not sum(self.redis.llen(k) for k in keys)
        except redis.RedisError:
            return False

    def workers(self) -> list[str]:
        assert self.stack is not None
        return [n for n, p in list(self.stack.procs.items()) if n.startswith("worker") and p.poll() is None]

    def ensure_workers(self) -> None:
        assert self.stack is not None
        for _ in range(self.args.workers - len(self.workers())):
            self.start_worker()
        for name in self.workers():
            self.wait_ready(name)

    def wait_ready(self, name: str, attempts: int = 3) -> None:
        """`Stack.wait_worker`, again if the ping met a stale broker connection: kombu pools connections per
        URL in this process, and after a Redis restart the first use of a pooled one fails."""
        assert self.stack is not None
        for attempt in range(attempts):
            try:
                return self.stack.wait_worker(name)
            except (redis.RedisError, OperationalError):
                if attempt == attempts - 1:
                    raise

    def start_worker(self) -> str:
        assert self.stack is not None
        with self._starting:  # the supervisor starts workers too
            return self.stack.start_worker()

    def supervise(self, run: Run) -> None:
        """compose.yaml's `restart: unless-stopped`: a worker that exits by itself (not one this benchmark
        stopped: those leave `stack.procs` first) is noted and, unless --no-restart-policy, started again."""
        assert self.stack is not None
        while not run.over.wait(0.5):
            for name, proc in list(self.stack.procs.items()):
                if name.startswith("worker") and proc.poll() is not None:
                    self.stack.procs.pop(name, None)
                    run.crashed += 1
                    new = self.start_worker() if self.args.restart_policy else None
                    since = time.time() - (run.t_fault or run.started)
                    run.notes.append(
                        f"{name} EXITED BY ITSELF (rc {proc.returncode}) {since:.1f} s after the fault"
                        + (f", restarted as {new}" if new else ", not restarted")
                    )

    def running(self, ids: list[str]) -> dict[str, list[str]]:
        """Running ids per worker process name (`worker3`), from the records."""
        ids = list(ids)  # a copy: the submitter thread may be extending it
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hmget(task_key(task_id), ["worker", "state"])
            rows = pipe.execute()
        out: dict[str, list[str]] = {}
        for task_id, (worker, state) in zip(ids, rows, strict=True):
            if worker and not state:
                out.setdefault(worker.split("@")[0], []).append(task_id)
        return out

    def busiest(self, ids: list[str]) -> tuple[str, list[str]]:
        """The live worker running the most of `ids` (the oldest if none runs any), and those ids."""
        running = self.running(ids)
        live = self.workers()
        victim = max(live, key=lambda n: (len(running.get(n, [])), -int(n.removeprefix("worker"))))
        return victim, running.get(victim, [])

    def is_ready(self, name: str) -> bool:
        """Whether the worker has loaded its models (worker/app.py logs it once the engine runs)."""
        log = self.log_dir / f"{name}.log"
        return log.exists() and "pagedq engine ready" in log.read_text(errors="replace")

    def all_running(self, ids: list[str]) -> list[str]:
        return [i for group in self.running(ids).values() for i in group]

    def deliveries(self, ids: list[str]) -> list[int]:
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hget(task_key(task_id), "deliveries")
            return [int(d or 0) for d in pipe.execute()]

    # -- submission ---------------------------------------------------------------------------------------

    def submit(self, jobs: list[Job], timeout_s: float | None = None, pace_s: float = 0.0) -> list[str]:
        """Submit in chunks (a bulk per task type, every SINGLE_EVERY-th alone), retrying through Redis outages."""
        ids: list[str] = []
        for start in range(0, len(jobs), self.args.chunk):
            chunk = [(k, j) for k, j in enumerate(jobs[start : start + self.args.chunk], start)]
            for k, job in chunk:
                if k % SINGLE_EVERY == 0:
                    ids.append(_retrying(lambda job=job: self.service.submit(job.task, _with(job, timeout_s))).id)
            for task_type in TaskType:
                bulk = [_with(j, timeout_s) for k, j in chunk if j.task is task_type and k % SINGLE_EVERY]
                if bulk:
                    ids += [r.id for r in _retrying(lambda t=task_type, b=bulk: self.service.submit_bulk(t, b))]
            time.sleep(pace_s)
        return ids

    def fault(self, run: Run, in_flight: list[str]) -> None:
        """Mark a fault now: the ids running at it, and (at the first) start submitting the rest."""
        now = time.time()
        if run.t_fault is None:
            run.t_fault = now
            run.submitter = threading.Thread(target=self._submit_rest, args=(run,), daemon=True)
            run.submitter.start()
        run.in_flight.update(dict.fromkeys(in_flight, now))

    def _submit_rest(self, run: Run) -> None:
        for start in range(0, len(run.rest), self.args.chunk):
            ids = self.submit(run.rest[start : start + self.args.chunk], pace_s=0.1)
            run.ids += ids
            run.watcher.add(ids)
            if start == 0:
                self.cancel_some(run, ids)

    def cancel_some(self, run: Run, ids: list[str]) -> None:
        """Cancel the last few of `ids` (just submitted, so most are still queued) and note how they end."""
        picked = ids[-max(2, self.args.tasks // 100) :]
        refused = 0
        for task_id in picked:
            try:
                _retrying(lambda t=task_id: self.service.cancel(t))
            except TaskAlreadyFinished:
                refused += 1
        run.checks.append(
            lambda: (
                f"cancel asked for {len(picked)} tasks just submitted ({refused} had finished first), they ended "
                f"{dict(Counter(run.watcher.last_state(i) for i in picked))}"
            )
        )

    def close(self) -> None:
        if self.stack is not None:
            self.service.close()
            self.app.close()
            self.redis.close()
            self.stack.stop()
            self.stack = None


def _with(job: Job, timeout_s: float | None) -> dict:
    return job.request if timeout_s is None else {**job.request, "timeout_s": timeout_s}


def _retrying(call: Callable, timeout_s: float = 90.0) -> object:
    """Retry `call` while Redis is unreachable (a restart); bad input and a finished task are raised at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except (ValidationError, PagedqError, TaskAlreadyFinished):
            raise
        except Exception:  # noqa: BLE001 - redis-py, kombu and Celery raise their own connection errors
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ---- the faults -------------------------------------------------------------------------------------------


def worker_sigkill(b: Bench, run: Run) -> None:
    assert b.stack is not None
    victim, in_flight = b.busiest(run.ids)
    b.fault(run, in_flight)
    b.stack.kill(victim, signal.SIGKILL)
    new = b.start_worker()
    run.notes.append(f"SIGKILL {victim} running {len(in_flight)} tasks; started {new}")


def worker_sigterm(b: Bench, run: Run) -> None:
    assert b.stack is not None
    victim, in_flight = b.busiest(run.ids)
    b.fault(run, in_flight)
    proc = b.stack.procs.pop(victim)
    os.killpg(proc.pid, signal.SIGTERM)
    new = b.start_worker()
    try:
        rc: int | str = proc.wait(b.args.drain_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "none: still running 30 s after its drain, SIGKILLed"
    exited = time.time() - (run.t_fault or 0)
    run.notes.append(
        f"SIGTERM {victim} running {len(in_flight)} tasks (drain {b.args.drain_s} s): exited after "
        f"{exited:.1f} s, rc {rc}; started {new}"
    )

    def drained() -> str:
        with b.redis.pipeline(transaction=False) as pipe:
            for task_id in in_flight:
                pipe.hmget(task_key(task_id), ["state", "requeues"])
            rows = pipe.execute()
        return (
            f"of the {len(in_flight)} in flight at SIGTERM: {sum(not int(r or 0) for _, r in rows)} finished "
            f"on {victim}, {sum(bool(int(r or 0)) for _, r in rows)} handed back; final states "
            f"{dict(Counter(s for s, _ in rows))}"
        )

    run.checks.append(drained)


def kills_in_a_row(b: Bench, run: Run) -> None:
    assert b.stack is not None
    victims = []
    for k in range(b.args.kills):
        if k:
            time.sleep(b.args.kill_gap_s)
        victim, in_flight = b.busiest(run.ids)
        b.fault(run, in_flight)
        b.stack.kill(victim, signal.SIGKILL)
        loading = "" if b.is_ready(victim) else ", still loading"
        victims.append(f"{victim} ({len(in_flight)} running{loading}) -> {b.start_worker()}")
    run.notes.append(f"{b.args.kills} SIGKILLs {b.args.kill_gap_s} s apart: " + ", ".join(victims))


def redis_restart(sig: signal.Signals) -> Callable[[Bench, Run], None]:
    def fault(b: Bench, run: Run) -> None:
        assert b.stack is not None and b.stack.redis is not None
        in_flight = b.all_running(run.ids)
        b.fault(run, in_flight)
        b.stack.redis.restart(sig, down_s=b.args.redis_down_s)
        back = time.time()
        run.notes.append(
            f"Redis {sig.name} with {len(in_flight)} tasks running, up again after "
            f"{back - (run.t_fault or back):.1f} s; {_ping_workers(b, back)}"
        )

    return fault


def _ping_workers(b: Bench, since: float, timeout_s: float = 30.0) -> str:
    """Whether every live worker answers a ping after a Redis restart (its control connection came back)."""
    while time.time() - since < timeout_s:
        live = b.workers()
        try:
            answered = b.service.ping_workers(timeout_s=1.0)
        except Exception:  # noqa: BLE001 - the control connection reconnects by itself
            answered = []
        if live and all(any(a.startswith(name + "@") for a in answered) for name in live):
            return f"{', '.join(live)} answered a ping {time.time() - since:.1f} s after it"
        time.sleep(0.2)
    return f"NOT every live worker ({', '.join(b.workers()) or 'none'}) answered a ping within {timeout_s:.0f} s"


def duplicate(b: Bench, run: Run) -> None:
    picked = b.all_running(run.ids)[: max(5, b.args.tasks // 30)]
    b.fault(run, picked)
    for task_id in picked:
        record = b.redis.hgetall(task_key(task_id))
        task_type = TaskType(record["type"])
        b.app.send_task(
            TASK_NAMES[task_type], args=[json.loads(record["message"])], task_id=task_id, queue=QUEUES[task_type]
        )
    run.notes.append(f"sent the stored message of {len(picked)} running tasks again, same ids")
    run.checks.append(lambda: f"deliveries of the re-sent ids: {dict(Counter(b.deliveries(picked)))}")


def poison(b: Bench, run: Run) -> None:
    b.fault(run, b.all_running(run.ids))
    for k in range(max(len(POISONS), b.args.tasks // 25)):
        kind, task_type, request = POISONS[k % len(POISONS)]
        task_id = f"poison-{kind}-{task_type.value}-{k}-{uuid.uuid4().hex[:8]}"
        b.service.records.create(task_id, task_type, "default", 0, None, {"request": request})
        b.app.send_task(
            TASK_NAMES[task_type],
            args=[{"request": request, "model": "default"}],
            task_id=task_id,
            queue=QUEUES[task_type],
        )
        run.poison[task_id] = kind
        run.watcher.add([task_id])
        time.sleep(0.02)  # spread over the good tasks' batches

    def outcomes() -> str:
        errors = Counter()
        for task_id, kind in run.poison.items():
            raw = b.redis.hget(task_key(task_id), "error")
            errors[(kind, run.watcher.last_state(task_id), json.loads(raw)["type"] if raw else None)] += 1
        return "poison (kind, state, error type): " + ", ".join(f"{k}: {n}" for k, n in sorted(errors.items(), key=str))

    run.checks.append(outcomes)


def deadline_kill(b: Bench, run: Run) -> None:
    assert b.stack is not None
    in_flight = b.all_running(run.ids)
    b.fault(run, in_flight)
    killed = b.workers()
    for name in killed:
        b.stack.kill(name, signal.SIGKILL)
    time.sleep(max(0.0, run.expire_by - time.time() + 1.0))
    new = [b.start_worker() for _ in range(b.args.workers)]
    for name in new:
        b.wait_ready(name)
    t0 = run.t_fault or 0.0
    run.notes.append(
        f"SIGKILL every worker ({', '.join(killed)}) with {len(in_flight)} tasks running; the short "
        f"deadlines passed {run.expire_by - t0:.1f} s after; {', '.join(new)} ready {time.time() - t0:.1f} s"
        " after the kill"
    )

    def late_starts() -> str:
        short = sorted(run.may_expire)
        with b.redis.pipeline(transaction=False) as pipe:
            for task_id in short:
                pipe.hmget(task_key(task_id), ["started_at", "deadline", "state"])
            rows = pipe.execute()
        late = sum(
            1
            for started, end, _ in rows
            if started and end and datetime.fromisoformat(started) > datetime.fromisoformat(end)
        )
        return f"short-deadline tasks: {dict(Counter(s for _, _, s in rows))}; started after their deadline: {late}"

    run.checks.append(late_starts)


FAULTS: dict[str, Callable[[Bench, Run], None]] = {
    "worker-sigkill": worker_sigkill,
    "worker-sigterm": worker_sigterm,
    "kills-in-a-row": kills_in_a_row,
    "redis-sigterm": redis_restart(signal.SIGTERM),
    "redis-sigkill": redis_restart(signal.SIGKILL),
    "duplicate": duplicate,
    "poison": poison,
    "deadline-kill": deadline_kill,
}


# ---- one fault, start to end -------------------------------------------------------------------------------


def run_fault(b: Bench, name: str) -> tuple[Row, list[str]]:
    """Run one fault on a clean stack; returns its row and descriptions of every task that went wrong."""
    args = b.args
    b.reset()
    assert b.stack is not None and b.stack.redis_url is not None
    jobs = mixed_jobs(args.tasks, args.seed, (args.min_new_tokens, args.max_new_tokens))
    split = int(len(jobs) * BEFORE_FAULT)
    run = Run(name, Watcher(b.service), DoneListener(b.stack.redis_url), rest=jobs[split:])
    run.watcher.start()
    run.done.start()
    threading.Thread(target=b.supervise, args=(run,), name="faults-supervisor", daemon=True).start()
    try:
        short = args.deadline_s if name == "deadline-kill" else None
        run.ids = b.submit(jobs[:split], timeout_s=short)
        run.watcher.add(run.ids)
        if short is not None:
            run.may_expire, run.expire_by = set(run.ids), time.time() + short
        wait_trigger(b, run)
        FAULTS[name](b, run)
        if run.submitter is not None:
            run.submitter.join(300)
        wait_final(b, run)
        return summarize(b, run)
    finally:
        run.over.set()
        run.watcher.stop()
        run.done.stop()


def wait_trigger(b: Bench, run: Run, timeout_s: float = 60.0) -> None:
    """Until --trigger-share of the tasks are final and at least two are running."""
    need = int(len(run.ids) * b.args.trigger_share)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        final = sum(run.watcher.last_state(i) in FINAL for i in run.ids)
        if final >= need and len(b.all_running(run.ids)) >= 2:
            return
        time.sleep(0.05)
    run.notes.append(f"the trigger ({need} final, 2 running) did not happen within {timeout_s:.0f} s: fault anyway")


def wait_final(b: Bench, run: Run) -> None:
    """Until every id is final, or no task has become final for --stall-s (the rest are lost); then watch
    --linger-s more for flips."""
    limit = time.monotonic() + b.args.timeout_s
    while run.watcher.open_ids() and time.monotonic() < limit:
        if time.time() - run.watcher.last_final_at > b.args.stall_s:
            break
        time.sleep(0.2)
    time.sleep(b.args.linger_s)


def summarize(b: Bench, run: Run) -> tuple[Row, list[str]]:
    w, ids, poison = run.watcher, list(run.ids), list(run.poison)
    states = Counter(w.last_state(i) for i in ids)
    lost = [i for i in ids + poison if w.last_state(i) not in FINAL]
    tracked = set(ids) | set(poison)
    flips = {**{i: s for i, s in run.done.twice().items() if i in tracked}, **w.flips()}
    failed = [i for i in ids if states and w.last_state(i) == "failed"]
    unexpected_expired = [i for i in ids if w.last_state(i) == "expired" and i not in run.may_expire]
    t_fault = run.t_fault or run.started
    back = {i: w.recovered_at(i, since) for i, since in run.in_flight.items()}
    never = [i for i, at in back.items() if at is None]
    recovered = [at for at in back.values() if at is not None]
    first = w.first_success_after(ids, t_fault)
    row = Row(
        fault=run.name, submitted=len(ids), succeeded=states["succeeded"], failed=len(failed),
        poison_failed=sum(w.last_state(i) == "failed" for i in poison), poison_sent=len(poison),
        expired=states["expired"], unexpected_expired=len(unexpected_expired), cancelled=states["cancelled"],
        lost=len(lost), flips=len(flips), reruns=sum(d >= 2 for d in b.deliveries(ids)),
        first_done_s=None if first is None else first - t_fault,
        recover_s=max(recovered) - t_fault if recovered else None, never_recovered=len(never),
        wall_s=w.last_final_at - run.started, crashed=run.crashed,
    )  # fmt: skip
    row.notes = run.notes + [check() for check in run.checks]
    row.notes.append(
        f"{len(run.in_flight)} in flight at the fault, their deliveries "
        f"{dict(Counter(b.deliveries(list(run.in_flight))))}; watcher: {w.redis_errors} polls failed"
    )
    problems = []
    for what, group in [
        ("lost", lost),
        ("flipped", list(flips)),
        ("failed (not poison)", failed),
        ("expired unexpectedly", unexpected_expired),
        ("in flight, never back", never),
    ]:
        problems += [f"{run.name}: {what}: {describe(b, run, i)}" for i in group[: b.args.describe]]
    return row, problems


def describe(b: Bench, run: Run, task_id: str) -> str:
    """A task's state sequence, its record and the worker log lines that name it."""
    try:
        record = b.redis.hgetall(task_key(task_id))
    except redis.RedisError as exc:
        record = {"unreadable": repr(exc)}
    fields = {k: record.get(k) for k in ("type", "state", "worker", "started_at", "deliveries", "requeues", "error")}
    lines = [f"{task_id}\n    seen: {run.watcher.history(task_id, run.started)}\n    record: {fields}"]
    for log in sorted(b.log_dir.glob("worker*.log")):
        hits = [line for line in log.read_text(errors="replace").splitlines() if task_id in line]
        lines += [f"    {log.name}: {line[:300]}" for line in hits[:6]]
    return "\n".join(lines)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=1000, help="tasks per fault")
    p.add_argument("--quick", action="store_true", help="150 tasks per fault (a few minutes on 2 cores)")
    p.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}")
    p.add_argument("--workers", type=int, default=2, help="worker processes before each fault")
    p.add_argument("--worker-threads", type=int, default=32, help="Celery threads per worker")
    p.add_argument("--drain-s", type=float, default=1.0, help="PAGEDQ_DRAIN_TIMEOUT_S of the workers")
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--kill-gap-s", type=float, default=3.0)
    p.add_argument("--redis-down-s", type=float, default=2.0)
    p.add_argument("--deadline-s", type=float, default=6.0, help="timeout_s of the tasks before the deadline-kill")
    p.add_argument("--trigger-share", type=float, default=0.15, help="share of tasks final before the fault")
    p.add_argument("--min-new-tokens", type=int, default=32, help="generative QA length, lower bound")
    p.add_argument("--max-new-tokens", type=int, default=384, help="generative QA length, upper bound")
    p.add_argument("--chunk", type=int, default=50, help="tasks per submission round")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stall-s", type=float, default=60.0, help="no task final for this long: the rest are lost")
    p.add_argument("--timeout-s", type=float, default=900.0, help="longest wait for all tasks of a fault")
    p.add_argument("--linger-s", type=float, default=3.0, help="watch this long after all are final (flips)")
    p.add_argument(
        "--no-restart-policy",
        dest="restart_policy",
        action="store_false",
        help="do not restart a worker that exits by itself (compose: restart: unless-stopped)",
    )
    p.add_argument("--describe", type=int, default=5, help="tasks described per kind of problem")
    p.add_argument("--models", type=Path, default=ROOT / ".models" / "demo", help="demo models (built if absent)")
    p.add_argument("--out", type=Path, default=ROOT / ".demo" / "faults", help="logs go here")
    plots.add_plot_argument(p, "faults")
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.quick:
        args.tasks = 150
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(names) - set(FAULTS):
        p.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    registry = build_demo_models(args.models)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    env = " ".join(f"{k}={v}" for k, v in {**LEASE_ENV, "PAGEDQ_DRAIN_TIMEOUT_S": args.drain_s}.items())
    print(
        f"Faults: {args.tasks} tasks per fault, {args.workers} workers x {args.worker_threads} threads, demo "
        f"models; worker env (Stack extra_env): {env}; {os.cpu_count()} CPUs, load average {load_average()}; "
        f"logs in {out}",
        flush=True,
    )
    bench = Bench(args, registry, out)
    rows, problems, errors = [], [], 0
    try:
        for k, name in enumerate(names, 1):
            try:
                row, found = run_fault(bench, name)
            except Exception as exc:  # noqa: BLE001 - report it, start the next fault on a fresh stack
                traceback.print_exc()
                row, found, errors = Row(name, notes=[f"ERROR: {exc!r}"]), [], errors + 1
                bench.close()
            rows.append(row)
            problems += found
            print(
                f"[{k}/{len(names)}] {name}: {row.submitted} submitted, {row.lost} lost, {row.flips} flips, "
                f"{row.failed} failed, in flight back in {row.recover_s or 0:.1f} s ({row.wall_s:.0f} s)",
                flush=True,
            )
    finally:
        bench.close()
    print()
    print(table(rows))
    print()
    for row in rows:
        print(f"- {row.fault}: " + "; ".join(row.notes))
    if problems:
        print("\nProblems:\n" + "\n".join(problems))
    print(plots.faults(rows, args.plot, f"{args.tasks} tasks per fault"))
    recover = [r.recover_s for r in rows if r.recover_s is not None]
    summary = {
        "faults_lost": sum(r.lost for r in rows), "faults_flips": sum(r.flips for r in rows),
        "faults_unexpected_failures": sum(r.failed for r in rows),
        "faults_poison_not_failed": sum(r.poison_sent - r.poison_failed for r in rows),
        "faults_unexpected_expired": sum(r.unexpected_expired for r in rows),
        "faults_never_recovered": sum(r.never_recovered for r in rows),
        "faults_worker_crashes": sum(r.crashed for r in rows), "faults_errors": errors,
        "faults_max_recover_s": f"{max(recover, default=0.0):.1f}",
        "faults_wall_s": f"{sum(r.wall_s for r in rows):.0f}",
    }  # fmt: skip
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
