"""The worker's garbage-collector settings (`freeze_startup_heap`, called by the Celery worker process and the
engine-core process once their models are loaded): short-lived objects cost no collection, cyclic garbage is
still collected. Run in a fresh interpreter: the settings are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import gc, json
    from pagedq.worker.runtime import GC_GEN0_THRESHOLD, freeze_startup_heap

    startup = [[i] for i in range(10_000)]  # what a worker builds at startup: frozen, never walked again
    freeze_startup_heap()
    before = gc.get_stats()[0]["collections"]
    for _ in range(5):  # bursts of work in flight (a bulk's requests, futures, outcomes), then freed
        inflight = [{"request": [i], "future": [i]} for i in range(GC_GEN0_THRESHOLD // 4)]
        del inflight
    churn = gc.get_stats()[0]["collections"] - before

    class Node:
        def __init__(self):
            self.me = self  # a reference cycle: only the collector frees it
    collected_before = sum(s["collected"] for s in gc.get_stats())
    for _ in range(3 * GC_GEN0_THRESHOLD):
        Node()
    collected = sum(s["collected"] for s in gc.get_stats()) - collected_before
    print(json.dumps({"threshold": gc.get_threshold()[0], "limit": GC_GEN0_THRESHOLD, "frozen": gc.get_freeze_count(),
                      "churn_collections": churn, "cycles_collected": collected}))
    """
)


def test_worker_gc_skips_short_lived_objects_and_still_collects_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["threshold"] == probe["limit"] > 700  # Python's default young threshold is 700
    assert probe["frozen"] >= 10_000  # the startup heap is out of the collector's reach
    # five bursts of ~75,000 containers in flight, freed by reference counting: no collection walked them
    # (with Python's 700, each burst cost ~100 young collections, each walking what was in flight)
    assert probe["churn_collections"] == 0
    # garbage in reference cycles is still collected by itself, one threshold's worth at a time
    assert probe["cycles_collected"] >= 2 * probe["limit"]
