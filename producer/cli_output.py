"""What the CLI writes: one JSON object per line on stdout, everything for humans on stderr.

Exit codes: 0 ok; 1 a task failed, expired or was cancelled (or Redis / the API is unreachable, or a wait
timed out); 2 bad input (validation errors, unknown model or id, a cancel of a finished task).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import httpx
import redis
import typer
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pagedq.producer.cli_inputs import InputError
from pagedq.producer.parsing import describe_errors
from pagedq.shared.errors import PagedqError
from pagedq.shared.models import TaskState, TaskStatus

EXIT_OK, EXIT_TASK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def stderr() -> Console:
    """A console on the current sys.stderr (looked up per call, so test runners can capture it)."""
    return Console(stderr=True, highlight=False)


def emit(model: BaseModel) -> None:
    """One JSON line on stdout."""
    typer.echo(model.model_dump_json())


def exit_code(statuses: Sequence[TaskStatus]) -> int:
    ok = all(s.state in (TaskState.SUCCEEDED, TaskState.QUEUED, TaskState.RUNNING) for s in statuses)
    return EXIT_OK if ok else EXIT_TASK_FAILED


@contextmanager
def progress(description: str, total: int, show: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, fed by the yielded `on_progress(done, total)` callback.

    The bar appears at the first callback, so input rejected before any work starts shows none.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=stderr(), disable=not show)
    task = bar.add_task(description, total=total)

    def on_progress(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        yield on_progress
    finally:
        if bar.live.is_started:
            bar.stop()


@contextmanager
def exit_codes(item_labels: Sequence[str] | None = None) -> Iterator[None]:
    """Turn the errors a command can meet into a message on stderr and the documented exit code."""
    try:
        yield
    except (InputError, ValidationError, PagedqError, TimeoutError, OSError) as exc:
        code, message = _describe(exc, item_labels)
    except (redis.RedisError, OperationalError) as exc:
        code, message = EXIT_TASK_FAILED, f"cannot reach Redis: {exc}"
    except httpx.HTTPError as exc:
        code, message = EXIT_TASK_FAILED, f"cannot reach the API: {exc}"
    else:
        return
    stderr().print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _describe(exc: Exception, item_labels: Sequence[str] | None) -> tuple[int, str]:
    if isinstance(exc, ValidationError):
        return EXIT_BAD_INPUT, "invalid input: " + describe_errors(exc.errors(), item_labels)
    if isinstance(exc, PagedqError):
        code = EXIT_BAD_INPUT if 400 <= exc.http_status < 500 else EXIT_TASK_FAILED
        return code, str(exc)
    if isinstance(exc, InputError):
        return EXIT_BAD_INPUT, str(exc)
    return EXIT_TASK_FAILED, str(exc)
