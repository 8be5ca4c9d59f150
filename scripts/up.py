"""`make up`: the demo stack (Redis, worker, HTTP API, Flower) in the foreground until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading

from rich.console import Console

from scripts.models import choose_registry
from scripts.stack import Stack


def main() -> int:
    console = Console()
    registry_path, _ = choose_registry(lambda m: console.print(f"[bold yellow]{m}[/]"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Stack(registry_path=registry_path) as stack:
        console.print(f"pagedq is up.\n  API      {stack.api_url}/docs   (X-API-Key: {stack.api_key})\n"
                      f"  Flower   {stack.flower_url}   ({stack.flower_auth})\n  metrics  {stack.metrics_url}\n"
                      f"  Redis    {stack.redis_url}\n  logs     {stack.log_dir}\nCtrl-C to stop.")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        console.print("stopping ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
