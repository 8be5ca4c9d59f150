"""`make up`: the local stack (Redis, a worker, the HTTP API, Flower) in the foreground until Ctrl-C.

Fixed ports, so the README's examples work as written; each can be changed (see `--help`). A child that exits
stops the whole stack: `make up` reports which one, its exit code and the end of its log, and exits 1 (it does
not restart anything). Ctrl-C or SIGTERM stops the API and Flower, then the worker (warm shutdown), then Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from scripts.models import choose_registry
from scripts.stack import ROOT, Stack

POLL_S = 0.5
LOG_DIR = ".demo/logs"


@dataclass(frozen=True)
class Port:
    flag: str
    env: str
    default: int
    what: str


PORTS = [
    Port("--api-port", "PAGEDQ_API_PORT", 8000, "the HTTP API"),
    Port("--redis-port", "PAGEDQ_REDIS_PORT", 6380, "the stack's own Redis (6379 is left to a system Redis)"),
    Port("--flower-port", "PAGEDQ_FLOWER_PORT", 5555, "Flower"),
    Port("--metrics-port", "PAGEDQ_METRICS_PORT", 9464, "the worker's Prometheus metrics"),
]


def say(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every option also reads the environment variable shown, e.g. `PAGEDQ_API_PORT=8001 make up` "
        "or `make up PAGEDQ_API_PORT=8001`. Models: PAGEDQ_DEMO_MODELS=auto|hub|demo, PAGEDQ_REGISTRY_PATH.")
    for port in PORTS:
        parser.add_argument(port.flag, type=int, default=int(os.environ.get(port.env, port.default)),
                            help=f"port of {port.what} (env {port.env}, default {port.default})")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDQ_API_KEY", "secret"),
                        help="the API key the HTTP API accepts (env PAGEDQ_API_KEY, default secret)")
    parser.add_argument("--log-dir", type=Path, default=Path(os.environ.get("PAGEDQ_LOG_DIR", LOG_DIR)),
                        help=f"each process's log file goes here (env PAGEDQ_LOG_DIR, default {LOG_DIR})")
    return parser.parse_args(argv)


def port_problems(args: argparse.Namespace) -> list[str]:
    """Why the stack could not listen on the chosen ports, one line per port, naming how to change it."""
    problems: list[str] = []
    seen: dict[int, str] = {}
    for port in PORTS:
        number = getattr(args, port.flag.lstrip("-").replace("-", "_"))
        change = f"choose another with {port.env}=N make up (or {port.flag} N)"
        if number in seen:
            problems.append(f"port {number} is given to both {seen[number]} and {port.what}: {change}")
        elif in_use(number):
            problems.append(f"port {number} ({port.what}) is already in use: {change}")
        seen[number] = port.what
    return problems


def in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def describe(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class Signals:
    """Ctrl-C and SIGTERM: while starting, interrupt the start (Stack.start stops what it started); once up,
    ask the supervision loop to stop; while stopping, only say so."""

    def __init__(self) -> None:
        self.phase = "starting"
        self.stop = threading.Event()
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.phase == "stopping":
            say("Still stopping: the worker finishes its in-flight tasks first ...")
        elif self.phase == "starting":
            self.phase = "stopping"
            raise KeyboardInterrupt
        else:
            self.stop.set()


def supervise(stack: Stack, signals: Signals) -> int:
    """Until a signal (0) or a child's exit (1, after reporting it)."""
    while not signals.stop.wait(POLL_S):
        exited = stack.exited()
        if exited:
            for name, code in exited.items():
                say(f"{name} exited ({describe(code)}). Last lines of {stack.log_path(name)}:")
                say("\n".join(stack.log_tail(name, 1500).splitlines()[-10:]))
            say("make up does not restart processes: stopping the whole stack.")
            return 1
    return 0


def banner(stack: Stack) -> str:
    redis_url = f"redis://localhost:{stack.redis_port}/0"
    logs = stack.log_dir.relative_to(ROOT) if stack.log_dir.is_relative_to(ROOT) else stack.log_dir
    return (f"pagedq is up. Ctrl-C stops it.\n"
            f"  API      http://localhost:{stack.api_port}   (X-API-Key: {stack.api_key}; docs at /docs)\n"
            f"  Redis    {redis_url}   (CLI: export PAGEDQ_REDIS_URL={redis_url})\n"
            f"  Flower   http://localhost:{stack.flower_port}   ({stack.flower_auth})\n"
            f"  metrics  http://localhost:{stack.metrics_port}/metrics\n"
            f"  logs     {logs}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = port_problems(args)
    if problems:
        print("make up cannot start:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    signals = Signals()
    try:
        models = choose_registry(say)
        stack = Stack(registry_path=models.registry_path, api_key=args.api_key, extra_env=models.env,
                      log_dir=(ROOT / args.log_dir).resolve(), progress=say, redis_port=args.redis_port,
                      api_port=args.api_port, flower_port=args.flower_port, metrics_port=args.metrics_port)
        say("Starting Redis, a worker, the HTTP API and Flower ...")
        stack.start()
    except KeyboardInterrupt:
        say("stopped")
        return 130
    except RuntimeError as exc:  # a child died or never answered; Stack.start stopped the rest
        print(f"make up could not start the stack: {exc}", file=sys.stderr)
        return 1
    signals.phase = "up"
    say(banner(stack))
    code = supervise(stack, signals)
    signals.phase = "stopping"
    say("Stopping ...")
    stack.stop()
    say("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
