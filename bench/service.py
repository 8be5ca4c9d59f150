"""W5 -- the whole service through the queue (handbook benchmarks.md), in one run.

Each stack has its own private Redis (AOF on) and one worker process of `--worker-threads` threads (default:
PAGEDQ_WORKER_CONCURRENCY, 64), logging at Celery's default level (WARNING) like the baseline workers. The
systems a target ratio compares -- in-process engine and pagedq bulk, pagedq single-item and the no-op closed
loop -- run in `--rounds` alternating rounds (default 3) with both stacks up, one system measured at a time,
so that both sides of a ratio see the same machine (this shared VM's speed drifts by up to 2x within a run);
the per-round ratios are printed. The mix and its naive baseline run afterwards, one stack up at a time:
  classifier executor in-process   the default classifier loaded as the worker loads it, every text added to
                                   its executor at once, stepped until done, once per round: the engine's
                                   ceiling, no queue
  pagedq, one task on an idle stack  `Client.classify(text).result()` for `--idle-tasks` texts, one at a time
  pagedq single-item, Client       C closed-loop clients (threads, own Client each): classify, wait, repeat
                                   (a 1/rounds share of the tasks per round)
  pagedq bulk                      one `bulk_classify` of every text, then `wait_all` (once per round)
  pagedq single-item, HTTP API     the same closed loop through `HTTPClient` (long polls: `GET /v1/tasks/{id}?wait=`)
  Celery no-op, closed / open      a no-op task with pagedq's Celery settings (results stored), the same pool;
                                   closed loop `send_task(...).get()`, and open loop (submit all, then get);
                                   Celery's consumer as it ships (the targets' baseline)
  Celery no-op on pagedq's consumer  the closed loop once more, its worker reading Redis as pagedq's does
                                   (worker/consumer_io.py): a reference row, what that change gives Celery
  pagedq mix / naive Celery mix    60% classify, 25% translate, 15% extractive QA, closed loop, against a plain
                                   Celery worker running transformers one request at a time (w5_naive_worker),
                                   the same jobs on both, each on its own stack loaded with the mix's models
Models: every row but the mix runs the tiny demo classifier (those rows measure the queue, not the model). The
mix runs `--models realistic` (default; bench/w5_models.py: DistilBERT-base-shaped classifier and extractive QA,
an OPUS-MT-en-de-shaped Marian translator, random weights, fp32, built once into .models/w5-realistic) with
each translation's `max_new_tokens` drawn from 16..48 (the random translator never stops on its own), or
`--models demo` (the demo models, lengths from the demo translator's generation config). The answers of the two
mix systems are compared job by job (w5_agreement) and the agreement printed, with each kind's median latency.
The stacks are warmed up first. Latency is submit-to-result per task, in the client; for the bulk, from the
bulk call to the task's `finished_at`; open loops from submission to the worker's completion time. Mean batch:
the classifier's requests per engine step during the run (`celery inspect stats`: the worker's Engine.stats()).
Redis cmds/task: INFO commandstats before and after the run (every client and process on that Redis) / tasks.
Where the time goes, printed under the table: median time per stage of a pagedq task (submit call; until a
worker claims it; in the worker; until the final status reaches the client) and CPU ms per task of each process
(worker, API, Redis, and this process: the clients), from /proc and INFO cpu around each run.

Run: `python bench/service.py` (2,000 tasks per system; the realistic mix 600), `--quick` (300; the realistic
mix 120: under 2 minutes on 2 cores). `--torch-threads N` sets the torch threads of every worker alike.
Plots tasks/s and p50/p99 latency per system (bench/plots.py) to bench/plots/w5.png (`--plot`).
Ends with one line (ratios of tasks/s; w5_vs_naive from the mix, on the models of `--models`):
w5_single_vs_noop=.. w5_bulk_vs_inprocess=.. w5_idle_p50_ms=.. w5_vs_naive=..
A closed loop's tasks/s in a ratio is its steady state (bench/w5_load.py: the completions while all C clients
were busy, without the start's burst and the end's drain); the line before it gives the whole-run ratios too.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import plots
import torch
from celery import Celery
from redis_delay import DelayedRedis
from w5_agreement import Answer, agreement, recording, time_by_kind
from w5_baselines import BaselineWorker, naive_client, noop_client, noop_open_loop
from w5_load import (
    Connect,
    Outcome,
    Phases,
    closed_loop,
    engine_counters,
    engine_model_stats,
    mean_batch,
    process_cpu_s,
    redis_commands,
    redis_cpu_s,
)
from w5_models import build_realistic_models
from w5_pagedq import InProcess, bulk, client_session, http_session, one_at_a_time, stage_medians
from w5_report import Row, cpu_per_task, engine_work, merge, table
from w5_workload import Job, classify_texts, mixed_jobs

from pagedq.shared.celery_config import make_celery
from pagedq.shared.models import TaskType
from pagedq.shared.redis_server import LocalRedis
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Settings
from pagedq.worker.demo.models import build_demo_models

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # scripts/ (the stack launcher) is not an installed package
from scripts.stack import Stack  # noqa: E402

DEMO_DIR = ROOT / ".models" / "demo"
REALISTIC_DIR = ROOT / ".models" / "w5-realistic"
WARMUP = 64
MIX_WARMUP = 32  # mix jobs each mix system runs before it is timed (every model, translations included)
#: every worker of the run logs at Celery's default level, as the baseline workers do (w5_baselines): INFO
#: would cost each task two log records the baselines do not write
WORKER_LOGLEVEL = "WARNING"
MAX_NEW_TOKENS = (16, 48)  # a realistic-mix translation's length, uniform in this range


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


def run_queue(
    args: argparse.Namespace, registry_path: Path, texts: list[str], phases: Phases, notes: list[str]
) -> dict[str, Row]:
    """The rows on the demo classifier. pagedq's stack and Celery's no-op worker (each with its own Redis) are
    up together, and the in-process engine is loaded here; the systems compared by a target ratio run in
    alternating rounds -- in-process, pagedq single-item, no-op closed loop, pagedq bulk, `--rounds` times, a
    `1/rounds` share of the single-item tasks each round -- so that each ratio sees the same machine: this
    shared VM's speed drifts by up to 2x within a run. A stack waiting for its turn costs ~nothing (heartbeats)."""
    c, timeout = args.clients, args.task_timeout
    singles = [Job("classify", {"text": t}) for t in texts]
    classifier = Registry.load(registry_path).defaults[TaskType.CLASSIFY]
    redis, proxy = None, None  # with --redis-delay-ms: pagedq's Redis, and the proxy every process reaches it by
    if args.redis_delay_ms > 0:
        redis = LocalRedis(appendonly=True, new_session=True).start()
        proxy = DelayedRedis(redis.port, args.redis_delay_ms).start()
        notes.append(f"every process of the queue rows (workers, API, clients) reached its Redis through a proxy "
                     f"holding each chunk {args.redis_delay_ms:g} ms in each direction (bench/redis_delay.py)")
    stack = Stack(registry_path=registry_path, log_dir=args.log_dir, worker_concurrency=args.worker_threads,
                  worker_loglevel=WORKER_LOGLEVEL, redis_url=proxy.url if proxy is not None else None)
    noop = BaselineWorker("w5_noop_worker", args.worker_threads, registry_path, args.log_dir, args.redis_delay_ms)
    with phases("engine in-process: load"):
        engine = InProcess(registry_path, Settings(registry_path=registry_path), texts[:WARMUP])
    _freeze_clients_heap()
    rounds: dict[str, list[Row]] = {"inprocess": [], "single": [], "noop": [], "bulk": []}
    rows: dict[str, Row] = {}
    try:
        with phases("stacks: start"):
            stack.start(flower=False)
            noop.start()
        settings = stack.settings()
        app = make_celery(settings)
        pids = {"worker": stack.procs[f"worker{stack.worker_count}"].pid, "api": stack.procs["api"].pid}
        probe = Probe(stack.redis_url or "", pids, app, classifier)
        noop_probe = Probe(noop.url, noop.pids())
        client = partial(client_session, settings, timeout)
        noop_client_ = partial(noop_client, noop.settings(), timeout)
        with phases("warm-up"):
            closed_loop(client, [Job("classify", {"text": t}) for t in classify_texts(WARMUP, seed=7)], c)
            closed_loop(noop_client_, texts[:WARMUP], c)
        with phases("pagedq: idle"):
            rows["idle"] = probe.measure(
                "pagedq, one task on an idle stack",
                1,
                lambda: one_at_a_time(settings, singles[: args.idle_tasks], timeout),
            )
        share = -(-len(texts) // args.rounds)
        for r in range(args.rounds):
            part = slice(r * share, (r + 1) * share)
            with phases("engine in-process"):
                outcome, batch = engine.run(texts)
                rounds["inprocess"].append(Row("classifier executor in-process (no queue)", outcome, None, batch))
            with phases("pagedq: single"):
                rounds["single"].append(probe.measure("pagedq single-item, Client", c,
                                                      lambda p=part: closed_loop(client, singles[p], c)))  # type: ignore[misc]
            with phases("no-op: closed"):
                rounds["noop"].append(noop_probe.measure("Celery no-op, closed loop (same settings, pool, Redis)", c,
                                                         lambda p=part: closed_loop(noop_client_, texts[p], c)))  # type: ignore[misc]
            with phases("pagedq: bulk"):
                rounds["bulk"].append(probe.measure("pagedq bulk_classify + wait_all", None,
                                                    lambda: bulk(settings, texts, timeout)))
        rows.update({key: merge(parts) for key, parts in rounds.items()})
        calls = [f"{row.outcome.extra['bulk call']:.2f}" for row in rounds["bulk"]]
        notes.append(f"bulk: the bulk_classify call of {len(texts)} texts took {', '.join(calls)} s (each round)")
        ratios = [f"{ratio(a, b):.2f}" for a, b in zip(rounds["single"], rounds["noop"], strict=True)]
        bulk_ratios = [f"{ratio(a, b):.2f}" for a, b in zip(rounds["bulk"], rounds["inprocess"], strict=True)]
        notes.append(f"per round: single vs no-op {', '.join(ratios)}; bulk vs in-process {', '.join(bulk_ratios)}")
        with phases("pagedq: http"):
            http = partial(http_session, stack.api_url, stack.api_key, timeout)
            rows["http"] = probe.measure("pagedq single-item, HTTP API", c, lambda: closed_loop(http, singles, c))
        with phases("no-op: open"):
            rows["noop_open"] = noop_probe.measure(
                "Celery no-op, open loop", None, lambda: noop_open_loop(noop.settings(), texts, timeout)
            )
        with phases("no-op on pagedq's consumer"):
            rows["noop_io"] = run_noop_on_pagedq_consumer(args, registry_path, texts)
        app.close()
    finally:
        with phases("stacks: stop"):
            stack.stop()
            noop.stop()
            if proxy is not None:
                proxy.stop()
            if redis is not None:
                redis.stop()
    return rows


def _freeze_clients_heap() -> None:
    """This process runs every system's clients: what it imported and loaded (torch, transformers, the
    in-process model) out of the garbage collector's reach, as the worker does at startup (worker/app.py), so
    that no client pays a full collection over it in a timed run (one cost a 2,000-text bulk call ~0.3 s)."""
    gc.collect()
    gc.freeze()


class Mix:
    """The mix's jobs and models, and every answer each system gave (job index -> `Answer`), for comparison."""

    SYSTEMS = {"pagedq": "pagedq mix, Client", "naive": "naive Celery + transformers mix"}

    def __init__(self, models: str, registry_path: Path, count: int) -> None:
        self.models, self.registry_path = models, registry_path
        lengths = MAX_NEW_TOKENS if models == "realistic" else None
        self.jobs = mixed_jobs(count, max_new_tokens=lengths)
        self.warmup = mixed_jobs(MIX_WARMUP, seed=7, max_new_tokens=lengths)
        self.answers: dict[str, dict[int, Answer]] = {name: {} for name in self.SYSTEMS}
        self.engine = ""  # what pagedq's executors did during the mix (`engine_work`)

    def measure(self, probe: Probe, system: str, connect: Connect, clients: int) -> Row:
        run = recording(connect, self.answers[system])
        name = f"{self.SYSTEMS[system]} ({self.models} models)"
        before = engine_model_stats(probe.app) if probe.app is not None else {}
        row = probe.measure(name, clients, lambda: closed_loop(run, list(enumerate(self.jobs)), clients))
        if probe.app is not None:
            self.engine = engine_work(before, engine_model_stats(probe.app))
        return row

    def notes(self) -> list[str]:
        ours, theirs = self.answers["pagedq"], self.answers["naive"]
        return [
            *agreement(self.jobs, ours, theirs),
            time_by_kind(self.SYSTEMS["pagedq"], "in worker", self.jobs, ours),
            time_by_kind(self.SYSTEMS["naive"], "in task", self.jobs, theirs),
            f"pagedq engine during the mix: {self.engine or 'no stats'}",
        ]


def run_pagedq_mix(args: argparse.Namespace, mix: Mix, phases: Phases) -> dict[str, Row]:
    """The mix on a pagedq stack of its own, loaded with the mix's models; answers kept in `mix.answers`."""
    c, timeout = args.clients, args.task_timeout
    classifier = Registry.load(mix.registry_path).defaults[TaskType.CLASSIFY]
    stack = Stack(registry_path=mix.registry_path, log_dir=args.log_dir, worker_concurrency=args.worker_threads,
                  worker_loglevel=WORKER_LOGLEVEL)
    with phases("pagedq mix: start stack"):
        stack.start(flower=False)
    try:
        settings = stack.settings()
        app = make_celery(settings)
        pids = {"worker": stack.procs[f"worker{stack.worker_count}"].pid, "api": stack.procs["api"].pid}
        client = partial(client_session, settings, timeout)
        with phases("pagedq mix: warm-up"):
            closed_loop(client, mix.warmup, c)
        with phases("pagedq mix: run"):
            rows = {"mix": mix.measure(Probe(stack.redis_url or "", pids, app, classifier), "pagedq", client, c)}
        app.close()
    finally:
        with phases("pagedq mix: stop stack"):
            stack.stop()
    return rows


def run_naive(args: argparse.Namespace, mix: Mix, phases: Phases) -> dict[str, Row]:
    c = args.clients
    with phases("naive: start worker"):
        worker = BaselineWorker("w5_naive_worker", args.worker_threads, mix.registry_path, args.log_dir).start()
    try:
        client = partial(naive_client, worker.settings(), args.task_timeout)
        with phases("naive: warm-up"):
            closed_loop(client, mix.warmup, c)
        with phases("naive: mix"):
            row = mix.measure(Probe(worker.url, worker.pids()), "naive", client, c)
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
    """a's rate over b's: closed loops in their steady state (`Row.rate`)."""
    return a.rate / b.rate


def whole_run_ratio(a: Row, b: Row) -> float:
    """The same, every task over the whole run (the ratio before the seventeenth session)."""
    return a.tasks_per_s / b.tasks_per_s


def run_noop_on_pagedq_consumer(args: argparse.Namespace, registry_path: Path, texts: list[str]) -> Row:
    """Celery's no-op closed loop again, its worker reading Redis with pagedq worker's consumer I/O
    (worker/consumer_io.py): what that change gives Celery itself. Not a target's baseline (the targets compare
    with Celery as it ships); a reference row, measured once, with its own Redis."""
    read_max = Settings(registry_path=registry_path).consumer_read_max
    worker = BaselineWorker("w5_noop_worker", args.worker_threads, registry_path, args.log_dir, args.redis_delay_ms,
                            extra_env={"W5_NOOP_CONSUMER_READ_MAX": str(read_max)}, name="w5_noop_consumer_io")
    with worker:
        connect = partial(noop_client, worker.settings(), args.task_timeout)
        closed_loop(connect, texts[:WARMUP], args.clients)
        return Probe(worker.url, worker.pids()).measure(
            f"Celery no-op, closed loop, on pagedq's consumer I/O (read max {read_max})", args.clients,
            lambda: closed_loop(connect, texts, args.clients))


def report(rows: dict[str, Row], phases: Phases, notes: list[str], args: argparse.Namespace) -> None:
    order = ["inprocess", "idle", "single", "bulk", "http", "noop", "noop_open", "noop_io", "mix", "naive"]
    print()
    print(table([rows[k] for k in order]))
    print()
    legend = [
        "latency: closed loops per task, in the client (submit to result); bulk and in-process from the first "
        "submission (all submitted at once) to each task's completion; open loop from each submission to the "
        "worker's date_done. mean batch: classifier requests per engine step (in the mix, of the classify tasks). "
        "steady tasks/s: a closed loop's completions while every client was busy (after the first `clients`, "
        "before the last `clients`); the targets' ratios compare these where both sides have one"
    ]
    for line in legend + where_time_goes(rows) + notes:
        print(f"- {line}")
    for key in order:
        for failure in rows[key].outcome.failures[:3]:
            print(f"- FAILED in {rows[key].system}: {failure}")
    print(f"- {phases.summary()}")
    print(f"- {plots.service([rows[k] for k in order], args.plot)}")
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
    print(f"- single vs the no-op on pagedq's consumer I/O (a reference, not a target): "
          f"{ratio(rows['single'], rows['noop_io']):.3f}")
    whole = [("single vs no-op", "single", "noop"), ("mix vs naive", "mix", "naive")]
    print("- whole-run ratios (every task over the whole run, as before the steady state was measured): "
          + ", ".join(f"{name} {whole_run_ratio(rows[a], rows[b]):.3f}" for name, a, b in whole))
    print("- targets (issue): " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in targets))
    print(" ".join(f"{key}={value:.3f}" for key, value in summary.items()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300 tasks per system instead of 2,000")
    p.add_argument("--tasks", type=int, default=None, help="tasks per system (default 2000, 300 with --quick)")
    p.add_argument(
        "--models",
        choices=("demo", "realistic"),
        default="realistic",
        help="models of the mix rows (pagedq mix vs naive); every other row runs the demo classifier",
    )
    p.add_argument(
        "--mix-tasks",
        type=int,
        default=None,
        help="mix tasks per system (default: --tasks on demo models; 600 realistic, 120 with --quick)",
    )
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients (threads)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the systems a target compares")
    p.add_argument("--worker-threads", type=int, default=None, help="Celery threads per worker (default: settings)")
    p.add_argument("--idle-tasks", type=int, default=50)
    p.add_argument(
        "--redis-delay-ms",
        type=float,
        default=0.0,
        help="the demo-classifier rows' processes (pagedq's and the no-op's workers, API and clients) reach "
        "Redis through a proxy that holds each chunk this long in each direction: a Redis across a network "
        "(bench/redis_delay.py; the proxy's CPU shares the machine). Default 0: no proxy",
    )
    p.add_argument("--task-timeout", type=float, default=300.0, help="seconds a client waits for one result")
    plots.add_plot_argument(p, "w5")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads of every worker and of the in-process engine (OMP_NUM_THREADS; default: "
        "torch's own, one per core). 1 is steadier on a machine other processes keep busy",
    )
    return p


def main() -> None:
    args = parser().parse_args()
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # inherited by every worker started below
        torch.set_num_threads(args.torch_threads)
    count = args.tasks or (300 if args.quick else 2000)
    registry_path = build_demo_models(DEMO_DIR)
    if args.models == "realistic":
        mix = Mix("realistic", build_realistic_models(REALISTIC_DIR), args.mix_tasks or (120 if args.quick else 600))
    else:
        mix = Mix("demo", registry_path, args.mix_tasks or count)
    settings = Settings(registry_path=registry_path)  # the engine settings a worker would read now
    args.worker_threads = args.worker_threads or settings.worker_concurrency
    args.log_dir = Path(tempfile.mkdtemp(prefix="w5-logs-"))
    texts = classify_texts(count)
    print(
        f"W5: {count} tasks per system on the demo models, the mix {len(mix.jobs)} tasks per system on the "
        f"{mix.models} models ({mix.registry_path}); {args.clients} closed-loop clients, one worker of "
        f"{args.worker_threads} threads per stack; {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), "
        f"torch threads {torch.get_num_threads()}, intra-op threads {settings.intra_op_threads or 'torch'}, "
        f"engine threads {settings.engine_threads}, "
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
    rows.update(run_queue(args, registry_path, texts, phases, notes))
    rows.update(run_pagedq_mix(args, mix, phases))
    rows.update(run_naive(args, mix, phases))
    notes += mix.notes()
    notes.append(f"load average after: {_load_average()}")
    report(rows, phases, notes, args)


def _load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    main()
