"""`make demo`: start the whole stack, push a mixed workload (and a few bad requests) through the HTTP API,
print every result or error and a throughput line, show Flower and the metrics, stop everything, exit 0."""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from scripts.models import choose_registry
from scripts.stack import Stack

console = Console(width=max(140, Console().width))
CONTEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the company of "
    "Gustave Eiffel and completed in 1889 for the World's Fair. It is 330 metres tall.",
    "Python is a programming language created by Guido van Rossum and first released in 1991. Its design "
    "emphasises code readability with significant indentation.",
]
TEXTS = ["I loved this film, the acting was wonderful.", "The service was slow and the food was cold.",
         "It was fine, nothing special.", "What a fantastic day at the beach!"]
QUESTIONS = ["Who designed it?", "When was it completed?", "How tall is it?", "Who created it?"]


def workload(generative_model: str | None) -> list[tuple[str, dict[str, Any]]]:
    jobs: list[tuple[str, dict[str, Any]]] = []
    for i in range(24):
        jobs.append(("classify", {"text": TEXTS[i % len(TEXTS)], "top_k": None}))
    for i in range(8):
        jobs.append(("translate", {"text": TEXTS[i % len(TEXTS)], "source_lang": "en", "target_lang": "de",
                                   "generation": {"max_new_tokens": 24}}))
    for i in range(12):
        jobs.append(("qa", {"question": QUESTIONS[i % 4], "context": CONTEXTS[i % 2]}))
    if generative_model:
        for i in range(8):
            jobs.append(("qa", {"question": QUESTIONS[i % 4], "context": CONTEXTS[i % 2], "mode": "generative",
                                "model": generative_model, "generation": {"max_new_tokens": 16}}))
    return jobs


BAD_REQUESTS: list[tuple[str, str, Any, bool]] = [
    ("empty text", "classify", {"text": ""}, True),
    ("unknown model", "classify", {"text": "hi", "model": "no-such-model"}, True),
    ("extra field", "classify", {"text": "hi", "colour": "blue"}, True),
    ("wrong type", "translate", {"text": 42}, True),
    ("unsupported language pair", "translate", {"text": "hi", "source_lang": "en", "target_lang": "xx"}, True),
    ("invalid JSON", "qa", "{not json", True),
    ("missing API key", "classify", {"text": "hi"}, False),
]


def summarise(result: dict[str, Any]) -> str:
    kind = result["type"]
    if kind == "classify":
        return f"{result['label']} ({result['score']:.3f})"
    if kind == "translate":
        return repr(result["translation"][:60])
    return repr(result["answer"][:60]) + (f" [{result['start']}:{result['end']}]" if result.get("start") is not None
                                          else "")


def main() -> int:
    models = choose_registry(lambda m: console.print(f"[bold yellow]{m}[/]"))
    from pagedq.shared.registry import Registry

    registry = Registry.load(models.registry_path)
    generative = next((s.name for s in registry.models.values() if s.mode == "generative"), None)
    stack = Stack(registry_path=models.registry_path, extra_env=models.env,
                  progress=lambda m: console.print(m, markup=False, highlight=False))
    console.print("Starting Redis, a worker, the HTTP API and Flower ...")
    started = time.perf_counter()
    with stack:
        console.print(f"Stack up in {time.perf_counter() - started:.1f}s: API {stack.api_url}  "
                      f"Flower {stack.flower_url} (user:password {stack.flower_auth})  metrics {stack.metrics_url}")
        http = httpx.Client(base_url=stack.api_url, headers={"X-API-Key": stack.api_key}, timeout=30)
        jobs = workload(generative)
        t0 = time.perf_counter()
        ids = [(kind, http.post(f"/v1/{kind}", json=body).raise_for_status().json()["id"]) for kind, body in jobs]
        statuses = wait_all(http, [i for _, i in ids])
        elapsed = time.perf_counter() - t0
        show_results(ids, statuses)
        show_bad_requests(stack)
        ok = sum(s["state"] == "succeeded" for s in statuses.values())
        console.print(f"[bold]throughput: {len(ids)} tasks ({ok} succeeded) in {elapsed:.2f}s = "
                      f"{len(ids) / elapsed:.1f} tasks/s[/] (submit over HTTP, long poll of /v1/statuses)")
        show_flower(stack)
        if models.is_demo:
            console.print("[yellow]Reminder: these were random-weight demo models; the outputs are meaningless.[/]")
        console.print("Stopping everything the demo started ...")
    return 0 if ok == len(ids) else 1


def wait_all(http: httpx.Client, ids: list[str], timeout_s: float = 300) -> dict[str, dict[str, Any]]:
    """Long polls of `POST /v1/statuses` over the unfinished ids, each answered as soon as one finishes."""
    pending, done = list(ids), {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        wait = min(30.0, max(0.0, deadline - time.monotonic()))
        body = {"ids": pending, "wait": wait, "until": "any"}
        for status in http.post("/v1/statuses", json=body, timeout=wait + 30).raise_for_status().json()["tasks"]:
            if status["state"] not in ("queued", "running"):
                done[status["id"]] = status
        pending = [i for i in pending if i not in done]
    for task_id in pending:
        done[task_id] = {"state": "timed out waiting", "id": task_id}
    return done


def show_results(ids: list[tuple[str, str]], statuses: dict[str, dict[str, Any]]) -> None:
    table = Table("task", "id", "state", "model", "result or error")
    for kind, task_id in ids:
        s = statuses[task_id]
        error = s.get("error") or {}
        detail = summarise(s["result"]) if s.get("result") else f"{error.get('type')}: {error.get('message')}"
        table.add_row(kind, task_id[:8], s["state"], s.get("model") or "", detail)
    console.print(table)


def show_bad_requests(stack: Stack) -> None:
    table = Table("bad request", "HTTP", "message")
    for label, kind, body, with_key in BAD_REQUESTS:
        headers = {"X-API-Key": stack.api_key} if with_key else {}
        if isinstance(body, str):
            r = httpx.post(f"{stack.api_url}/v1/{kind}", content=body, headers={**headers,
                           "Content-Type": "application/json"})
        else:
            r = httpx.post(f"{stack.api_url}/v1/{kind}", json=body, headers=headers)
        table.add_row(label, str(r.status_code), error_message(r))
    console.print(table)


def error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['type']}: {error['message']}"[:100]
    except (ValueError, KeyError, TypeError):
        return response.text[:100]


def show_flower(stack: Stack) -> None:
    user, password = stack.flower_auth.split(":")
    try:
        workers = httpx.get(f"{stack.flower_url}/api/workers", auth=(user, password), params={"refresh": "true"},
                            timeout=10).json()
        console.print(f"Flower at {stack.flower_url} lists workers: {sorted(workers)}")
    except (httpx.HTTPError, ValueError) as exc:
        console.print(f"[red]Flower API not answering: {exc}[/]")


if __name__ == "__main__":
    sys.exit(main())
