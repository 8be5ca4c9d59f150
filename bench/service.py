"""W5 -- the whole service through the queue (handbook benchmarks.md), in one run on the demo models.

Each system runs alone on the machine (one stack up at a time), with its own private Redis (AOF on) and one
worker process of `--worker-threads` threads (default: PAGEDQ_WORKER_CONCURRENCY, 64):
  classifier executor in-process   the default classifier loaded as the worker loads it, every text added to
                                   its executor at once, stepped until done (median of 3): the engine's
                                   ceiling, no queue
  pagedq, one task on an idle stack  `Client.classify(text).result()` for `--idle-tasks` texts, one at a time
  pagedq single-item, Client       C closed-loop clients (threads, own Client each): classify, wait, repeat
  pagedq bulk                      one `bulk_classify` of every text, then `wait_all`
  pagedq single-item, HTTP API     the same closed loop through `HTTPClient` (it polls: 0.2 s, then x1.5)
  Celery no-op, closed / open      a no-op task with pagedq's Celery settings (results stored), the same pool;
                                   closed loop `send_task(...).get()`, and open loop (submit all, then get)
  pagedq mix / naive Celery mix    60% classify, 25% translate, 15% extractive QA, closed loop, against a plain
                                   Celery worker running transformers one request at a time (w5_naive_worker)
The stacks are warmed up first. Latency is submit-to-result per task, in the client; for the bulk, from the
bulk call to the task's `finished_at`; open loops from submission to the worker's completion time. Mean batch:
the classifier's requests per engine step during the run (`celery inspect stats`: the worker's Engine.stats()).
Redis cmds/task: INFO commandstats before and after the run (every client and process on that Redis) / tasks.
Where the time goes, printed under the table: median time per stage of a pagedq task (submit call; until a
worker claims it; in the worker; until the final status reaches the client) and CPU ms per task of each process
(worker, API, Redis, and this process: the clients), from /proc and INFO cpu around each run.

Run: `python bench/service.py` (2,000 tasks per system), `--quick` (300). Ends with one line:
w5_single_vs_noop=.. w5_bulk_vs_inprocess=.. w5_idle_p50_ms=.. w5_vs_naive=..  (ratios of tasks/s)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from celery import Celery
from w5_baselines import BaselineWorker, naive_client, noop_client, noop_open_loop
from w5_load import (
    Outcome,
    Phases,
    closed_loop,
    engine_counters,
    mean_batch,
    process_cpu_s,
    redis_commands,
    redis_cpu_s,
)
from w5_pagedq import bulk, client_session, http_session, in_process, one_at_a_time, stage_medians
from w5_report import Row, cpu_per_task, plot, table
from w5_workload import Job, classify_texts, mixed_jobs

from shared.celery_config import make_celery
from shared.models import TaskType
from shared.registry import Registry
from shared.settings import Settings
from worker.demo_models import build_demo_models

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # scripts/ (the stack launcher) is not an installed package
from scripts.stack import Stack  # noqa: E402

DEMO_DIR = ROOT / ".models" / "demo"
WARMUP = 64


class Probe:
    """Counts what one stack did during a run: Redis commands, CPU time of its processes (`pids`, Redis, and
    this process: the clients), and, given the pagedq workers' `app`, the engine's steps."""

    def __init__(self, redis_url: str, pids: dict[str, int], app: Celery | None = None, model: str = "") -> None:
        self.redis_url, self.pids, self.app, self.model = redis_url, pids, app, model

    def measure(self, system: str, clients: int | None, run: Callable[[], Outcome]) -> Row:
        engine_before = engine_counters(self.app) if self.app is not None else None
        calls_before, cpu_before = redis_commands(self.redis_url), self._cpu()
        outcome = run()
        cpu = {name: s - cpu_before[name] for name, s in self._cpu().items()}
        calls = redis_commands(self.redis_url) - calls_before
        engine_after = engine_counters(self.app) if self.app is not None else None
        return Row(system, outcome, clients, mean_batch(engine_before, engine_after, self.model), calls, cpu)

    def _cpu(self) -> dict[str, float]:
        cpu = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        return {**cpu, "redis": redis_cpu_s(self.redis_url), "clients": time.process_time()}


def run_pagedq(
    args: argparse.Namespace, registry_path: Path, texts: list[str], jobs: list[Job], phases: Phases, notes: list[str]
) -> dict[str, Row]:
    c, timeout = args.clients, args.task_timeout
    singles = [Job("classify", {"text": t}) for t in texts]
    classifier = Registry.load(registry_path).defaults[TaskType.CLASSIFY]
    stack = Stack(registry_path=registry_path, log_dir=args.log_dir, worker_concurrency=args.worker_threads)
    rows: dict[str, Row] = {}
    with phases("pagedq: start stack"):
        stack.start(flower=False)
    try:
        settings = stack.settings()
        app = make_celery(settings)
        pids = {"worker": stack.procs[f"worker{stack.worker_count}"].pid, "api": stack.procs["api"].pid}
        probe = Probe(stack.redis_url or "", pids, app, classifier)
        client = partial(client_session, settings, timeout)
        with phases("pagedq: warm-up"):
            closed_loop(client, mixed_jobs(WARMUP, seed=7), c)
        with phases("pagedq: idle"):
            rows["idle"] = probe.measure(
                "pagedq, one task on an idle stack",
                1,
                lambda: one_at_a_time(settings, singles[: args.idle_tasks], timeout),
            )
        with phases("pagedq: single"):
            rows["single"] = probe.measure("pagedq single-item, Client", c, lambda: closed_loop(client, singles, c))
        with phases("pagedq: bulk"):
            rows["bulk"] = probe.measure(
                "pagedq bulk_classify + wait_all", None, lambda: bulk(settings, texts, timeout)
            )
            notes.append(
                f"bulk: the bulk_classify call of {len(texts)} texts took "
                f"{rows['bulk'].outcome.extra['bulk call']:.2f} s"
            )
        with phases("pagedq: http"):
            http = partial(http_session, stack.api_url, stack.api_key, timeout)
            rows["http"] = probe.measure("pagedq single-item, HTTP API", c, lambda: closed_loop(http, singles, c))
        with phases("pagedq: mix"):
            rows["mix"] = probe.measure("pagedq mix, Client", c, lambda: closed_loop(client, jobs, c))
        app.close()
    finally:
        with phases("pagedq: stop stack"):
            stack.stop()
    return rows


def run_noop(args: argparse.Namespace, registry_path: Path, texts: list[str], phases: Phases) -> dict[str, Row]:
    c, timeout = args.clients, args.task_timeout
    with phases("no-op: start worker"):
        worker = BaselineWorker("w5_noop_worker", args.worker_threads, registry_path, args.log_dir).start()
    try:
        probe, client = Probe(worker.url, worker.pids()), partial(noop_client, worker.settings(), timeout)
        with phases("no-op: warm-up"):
            closed_loop(client, texts[:WARMUP], c)
        with phases("no-op: closed"):
            closed = probe.measure("Celery no-op, closed loop", c, lambda: closed_loop(client, texts, c))
        with phases("no-op: open"):
            opened = probe.measure(
                "Celery no-op, open loop", None, lambda: noop_open_loop(worker.settings(), texts, timeout)
            )
    finally:
        with phases("no-op: stop worker"):
            worker.stop()
    return {"noop": closed, "noop_open": opened}


def run_naive(args: argparse.Namespace, registry_path: Path, jobs: list[Job], phases: Phases) -> dict[str, Row]:
    c = args.clients
    with phases("naive: start worker"):
        worker = BaselineWorker("w5_naive_worker", args.worker_threads, registry_path, args.log_dir).start()
    try:
        client = partial(naive_client, worker.settings(), args.task_timeout)
        with phases("naive: warm-up"):
            closed_loop(client, mixed_jobs(WARMUP // 2, seed=7), c)
        with phases("naive: mix"):
            row = Probe(worker.url, worker.pids()).measure(
                "naive Celery + transformers mix", c, lambda: closed_loop(client, jobs, c)
            )
    finally:
        with phases("naive: stop worker"):
            worker.stop()
    return {"naive": row}


def where_time_goes(rows: dict[str, Row]) -> list[str]:
    """Median stage times of the pagedq rows (client clock + the task's timestamps), then CPU ms per task."""
    lines = []
    for key in ("idle", "single", "http", "mix"):
        stages = stage_medians(rows[key].outcome.samples)
        if stages:
            parts = ", ".join(f"{name} {1000 * s:.1f}" for name, s in stages.items())
            lines.append(f"{rows[key].system}: median ms per stage: {parts}")
    for row in rows.values():
        if cpu_per_task(row):
            lines.append(f"{row.system}: CPU ms per task: {cpu_per_task(row)}")
    return lines


def ratio(a: Row, b: Row) -> float:
    return a.tasks_per_s / b.tasks_per_s


def report(rows: dict[str, Row], phases: Phases, notes: list[str], args: argparse.Namespace) -> None:
    order = ["inprocess", "idle", "single", "bulk", "http", "noop", "noop_open", "mix", "naive"]
    print()
    print(table([rows[k] for k in order]))
    print()
    legend = [
        "latency: closed loops per task, in the client (submit to result); bulk and in-process from the first "
        "submission (all submitted at once) to each task's completion; open loop from each submission to the "
        "worker's date_done. mean batch: classifier requests per engine step (in the mix, of the classify tasks)"
    ]
    for line in legend + where_time_goes(rows) + notes:
        print(f"- {line}")
    for key in order:
        for failure in rows[key].outcome.failures[:3]:
            print(f"- FAILED in {rows[key].system}: {failure}")
    print(f"- {phases.summary()}")
    print(f"- {plot([rows[k] for k in order], args.plot)}")
    summary = {
        "w5_single_vs_noop": ratio(rows["single"], rows["noop"]),
        "w5_bulk_vs_inprocess": ratio(rows["bulk"], rows["inprocess"]),
        "w5_idle_p50_ms": rows["idle"].latency_ms(50),
        "w5_vs_naive": ratio(rows["mix"], rows["naive"]),
    }
    targets = [
        ("single >= 0.8x no-op", summary["w5_single_vs_noop"] >= 0.8),
        ("bulk >= 0.8x in-process", summary["w5_bulk_vs_inprocess"] >= 0.8),
        ("idle p50 <= 25 ms", summary["w5_idle_p50_ms"] <= 25),
        ("mix >= 5x naive", summary["w5_vs_naive"] >= 5),
    ]
    print("- targets (issue): " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in targets))
    print(" ".join(f"{key}={value:.3f}" for key, value in summary.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300 tasks per system instead of 2,000")
    p.add_argument("--tasks", type=int, default=None, help="tasks per system (default 2000, 300 with --quick)")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients (threads)")
    p.add_argument("--worker-threads", type=int, default=None, help="Celery threads per worker (default: settings)")
    p.add_argument("--idle-tasks", type=int, default=50)
    p.add_argument("--task-timeout", type=float, default=300.0, help="seconds a client waits for one result")
    p.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "results" / "w5.png")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads of every worker and of the in-process engine (OMP_NUM_THREADS; default: "
        "torch's own, one per core). 1 is steadier on a machine other processes keep busy",
    )
    args = p.parse_args()
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # inherited by every worker started below
        torch.set_num_threads(args.torch_threads)
    count = args.tasks or (300 if args.quick else 2000)
    registry_path = build_demo_models(DEMO_DIR)
    settings = Settings(registry_path=registry_path)  # the engine settings a worker would read now
    args.worker_threads = args.worker_threads or settings.worker_concurrency
    args.log_dir = Path(tempfile.mkdtemp(prefix="w5-logs-"))
    texts, jobs = classify_texts(count), mixed_jobs(count)
    print(
        f"W5: {count} tasks per system, {args.clients} closed-loop clients, one worker of {args.worker_threads} "
        f"threads per stack, demo models; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {_load_average()}; "
        f"logs in {args.log_dir}",
        flush=True,
    )
    phases, notes, rows = Phases(), [], {}
    busy = float(_load_average().split()[0])
    if busy > (os.cpu_count() or 1) / 2:
        notes.append(
            f"the machine was busy before this run (load average {busy:.1f} on {os.cpu_count()} CPUs): "
            "other processes share the cores, so expect noise; compare ratios from quiet runs"
        )
    with phases("engine in-process"):
        outcome, batch = in_process(registry_path, settings, texts, WARMUP)
        rows["inprocess"] = Row("classifier executor in-process (no queue)", outcome, None, batch)
    rows.update(run_pagedq(args, registry_path, texts, jobs, phases, notes))
    rows.update(run_noop(args, registry_path, texts, phases))
    rows.update(run_naive(args, registry_path, jobs, phases))
    notes.append(f"load average after: {_load_average()}")
    report(rows, phases, notes, args)


def _load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    main()
