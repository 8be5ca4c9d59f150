"""`pagedq`: submit NLP tasks from the shell and fetch their results.

    pagedq classify "I loved it" "I hated it" --wait
    pagedq classify --file reviews.txt            # one text per line; `-` reads stdin
    pagedq translate "Hello" --source en --target de --wait
    pagedq qa --question "Who?" --context "Ada wrote it." --wait
    pagedq qa --file questions.jsonl              # {"question": ..., "context": ...} per line
    pagedq status ID | pagedq wait ID --timeout 60 | pagedq cancel ID

Straight onto Redis (`--redis-url`, env PAGEDQ_REDIS_URL) or through the HTTP API (`--api URL --api-key KEY`).
stdout: one JSON object per line (a submission, or with --wait the final status); stderr: messages and
progress bars. Exit codes: 0 ok, 1 a task failed / expired / was cancelled, 2 bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

from pagedq.producer.base import BaseClient
from pagedq.producer.cli_inputs import InputError, Inputs, jsonl_inputs, text_inputs
from pagedq.producer.cli_output import emit, exit_code, exit_codes, progress
from pagedq.producer.client import Client, HTTPClient
from pagedq.producer.submission import task_location
from pagedq.shared.models import SubmitResponse, TaskType

app = typer.Typer(
    name="pagedq",
    help="Submit NLP tasks (classify, translate, qa) to the pagedq queues and fetch their results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Texts = Annotated[list[str] | None, typer.Argument(help="Texts to submit, one task each; `-` reads stdin lines.")]
File = Annotated[
    str | None, typer.Option("--file", "-f", help="Read inputs from this file, one per line (`-`: stdin).")
]
Model = Annotated[str | None, typer.Option("--model", "-m", help="Registry model name (default: per task type).")]
Priority = Annotated[int | None, typer.Option("--priority", "-p", help="-100..100, lower runs first (default 0).")]
Timeout = Annotated[float | None, typer.Option("--timeout", help="Task deadline in seconds from submission.")]
Wait = Annotated[bool, typer.Option("--wait", "-w", help="Wait for the results and print final statuses.")]
Api = Annotated[str | None, typer.Option("--api", envvar="PAGEDQ_API_URL", help="Go through this HTTP API.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="PAGEDQ_API_KEY", help="API key for --api.")]
RedisUrl = Annotated[
    str | None, typer.Option("--redis-url", envvar="PAGEDQ_REDIS_URL", help="Redis to submit to (without --api).")
]
WaitTimeout = Annotated[float | None, typer.Option("--timeout", help="Give up waiting after this many seconds.")]


@dataclass(frozen=True)
class Connection:
    """Where a command sends: the HTTP API with --api, else straight to Redis."""

    api: str | None
    api_key: str | None
    redis_url: str | None

    def client(self) -> BaseClient:
        return HTTPClient(self.api, self.api_key) if self.api else Client(self.redis_url)


@app.command()
def classify(
    texts: Texts = None,
    file: File = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Labels to return, best first.")] = None,
    model: Model = None,
    priority: Priority = None,
    timeout: Timeout = None,
    wait: Wait = False,
    api: Api = None,
    api_key: ApiKey = None,
    redis_url: RedisUrl = None,
) -> None:
    """Classify texts: one task per TEXT argument or per line of --file."""
    with exit_codes():
        inputs = text_inputs(texts, file)
    options = _options(model, priority, timeout, top_k=top_k)
    _submit(TaskType.CLASSIFY, inputs, options, wait, Connection(api, api_key, redis_url))


@app.command()
def translate(
    texts: Texts = None,
    file: File = None,
    source: Annotated[str | None, typer.Option("--source", "-s", help="Source language, e.g. en.")] = None,
    target: Annotated[str | None, typer.Option("--target", "-t", help="Target language, e.g. de.")] = None,
    model: Model = None,
    priority: Priority = None,
    timeout: Timeout = None,
    wait: Wait = False,
    api: Api = None,
    api_key: ApiKey = None,
    redis_url: RedisUrl = None,
) -> None:
    """Translate texts: one task per TEXT argument or per line of --file."""
    with exit_codes():
        inputs = text_inputs(texts, file)
    options = _options(model, priority, timeout, source_lang=source, target_lang=target)
    _submit(TaskType.TRANSLATE, inputs, options, wait, Connection(api, api_key, redis_url))


@app.command()
def qa(
    question: Annotated[str | None, typer.Option("--question", "-q", help="The question.")] = None,
    context: Annotated[str | None, typer.Option("--context", "-c", help="The text to answer from.")] = None,
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="JSON lines of {question, context, ...} (`-`: stdin).")
    ] = None,
    model: Model = None,
    priority: Priority = None,
    timeout: Timeout = None,
    wait: Wait = False,
    api: Api = None,
    api_key: ApiKey = None,
    redis_url: RedisUrl = None,
) -> None:
    """Answer a question over a context, or one per JSON line of --file."""
    with exit_codes():
        inputs = _qa_inputs(question, context, file)
    _submit(TaskType.QA, inputs, _options(model, priority, timeout), wait, Connection(api, api_key, redis_url))


@app.command()
def status(task_id: str, api: Api = None, api_key: ApiKey = None, redis_url: RedisUrl = None) -> None:
    """Print a task's status (exit 1 if it failed, expired or was cancelled)."""
    with exit_codes():
        with Connection(api, api_key, redis_url).client() as client:
            current = client.status(task_id)
    emit(current)
    raise typer.Exit(exit_code([current]))


@app.command("wait")
def wait_(
    task_id: str, timeout: WaitTimeout = None, api: Api = None, api_key: ApiKey = None, redis_url: RedisUrl = None
) -> None:
    """Wait until a task is final and print its status (exit 1 unless it succeeded)."""
    with exit_codes():
        with Connection(api, api_key, redis_url).client() as client:
            final = client.wait(task_id, timeout)
    emit(final)
    raise typer.Exit(exit_code([final]))


@app.command()
def cancel(task_id: str, api: Api = None, api_key: ApiKey = None, redis_url: RedisUrl = None) -> None:
    """Cancel a queued or running task and print its status (exit 2 if it already finished)."""
    with exit_codes():
        with Connection(api, api_key, redis_url).client() as client:
            emit(client.cancel(task_id))


def _qa_inputs(question: str | None, context: str | None, file: str | None) -> Inputs:
    if file is not None:
        if question is not None or context is not None:
            raise InputError("give --question and --context, or --file, not both")
        return jsonl_inputs(file)
    if question is None or context is None:
        raise InputError("give --question and --context (or --file with JSON lines)")
    inputs = Inputs()
    inputs.add({"question": question, "context": context}, "arguments")
    return inputs


def _options(model: str | None, priority: int | None, timeout: float | None, **extra: Any) -> dict[str, Any]:
    """Request fields given on the command line (unset ones are left to the request's defaults)."""
    given = {"model": model, "priority": priority, "timeout_s": timeout, **extra}
    return {name: value for name, value in given.items() if value is not None}


def _submit(task_type: TaskType, inputs: Inputs, options: dict[str, Any], wait: bool, to: Connection) -> None:
    """Submit every input (one task, or one all-or-nothing bulk), print each, optionally wait for all."""
    items = [{**options, **item} for item in inputs.items]
    many = len(items) > 1
    with exit_codes(inputs.labels), to.client() as client:
        if many:
            with progress(f"Submitting {len(items)} {task_type.value} tasks", len(items)) as on_progress:
                handles = client.bulk(task_type, items, on_progress)
        else:
            handles = [client.submit(items[0], task_type)]
        if not wait:
            for handle in handles:
                emit(SubmitResponse(id=handle.id, type=handle.type, location=task_location(handle.id)))
            return
        with progress(f"Waiting for {len(handles)} results", len(handles), show=many) as on_progress:
            statuses = client.wait_all([h.id for h in handles], on_progress=on_progress)
    for final in statuses:
        emit(final)
    raise typer.Exit(exit_code(statuses))


if __name__ == "__main__":
    app()
