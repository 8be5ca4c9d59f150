"""Waiting for tasks by polling their status: shared by the service and the HTTP client."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from shared.models import TaskStatus

#: Longest pause between two polls: a short task is seen quickly, a long one is not polled too often.
MAX_POLL_INTERVAL_S = 2.0


def wait_for(
    get_status: Callable[[str], TaskStatus], task_id: str, timeout_s: float | None, poll_interval: float = 0.2
) -> TaskStatus:
    """Poll `get_status(task_id)` until the task is final; TimeoutError after `timeout_s` (None: no limit)."""
    return wait_for_all(lambda ids: [get_status(i) for i in ids], [task_id], timeout_s, poll_interval)[0]


def wait_for_all(
    get_statuses: Callable[[Sequence[str]], list[TaskStatus]],
    task_ids: Sequence[str],
    timeout_s: float | None,
    poll_interval: float = 0.2,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[TaskStatus]:
    """Poll until every task is final, asking only about the unfinished ones; statuses in `task_ids` order.

    `on_progress(finished, total)` is called after every poll. TimeoutError after `timeout_s`.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    final: dict[str, TaskStatus] = {}
    pending = list(dict.fromkeys(task_ids))
    total = len(pending)
    interval = poll_interval
    while True:
        for status in get_statuses(pending):
            if status.state.is_final:
                final[status.id] = status
        pending = [t for t in pending if t not in final]
        if on_progress is not None:
            on_progress(total - len(pending), total)
        if not pending:
            return [final[t] for t in task_ids]
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{len(pending)} of {total} tasks not finished after {timeout_s} s")
        pause = interval if deadline is None else min(interval, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
        interval = min(interval * 1.5, max(poll_interval, MAX_POLL_INTERVAL_S))
