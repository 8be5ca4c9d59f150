"""The HTTP API against its own OpenAPI schema: what /openapi.json states is what the server enforces.

The last test runs schemathesis (`st run`) against a live uvicorn process on the session's private
redis-server, with the limits set through the environment as an operator would. No worker runs: tasks stay
queued. To explore further than the test's fixed seed, run the same against `make up`:

    st run http://127.0.0.1:8000/openapi.json -H "X-API-Key: demo-key" --max-examples 300
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from repo_paths import ROOT

from pagedq.producer.api import create_app
from pagedq.shared.redis_server import free_port
from pagedq.shared.settings import Limits, Settings

BIN = Path(sys.executable).parent
KEY = "schema-key"
REGISTRY_TOML = """
[models.sentiment]
task = "classify"
source = "./sentiment"

[models.en-de]
task = "translate"
source = "./en-de"
languages = ["en-de"]

[models.multi]
task = "translate"
source = "./multi"
languages = ["de-fr", "fr-de"]

[models.squad]
task = "qa"
source = "./squad"
"""
#: Small limits, so that schemathesis reaches them (and their boundaries stay cheap to send).
LIMITS = Limits(
    max_text_chars=40,
    max_context_chars=120,
    max_new_tokens=16,
    max_beams=3,
    max_timeout_s=60,
    max_bulk=4,
    max_body_bytes=20_000,
    max_json_depth=6,
    max_wait_s=0.5,  # long polls and streams of tasks that never finish (no worker) end quickly
    max_stream_s=1.0,
)
#: DELETE cancels a task and GET still shows it (`cancelled`): schemathesis's use-after-free check assumes
#: DELETE removes. /readyz is 503 while no worker answers (none runs here), as documented.
SCHEMATHESIS_CONFIG = """
[checks.use_after_free]
enabled = false

[[operations]]
include-path = "/readyz"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


@pytest.fixture()
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY_TOML)
    return path


@pytest.fixture()
def schema(redis_url: str, registry: Path) -> dict[str, Any]:
    settings = Settings(redis_url=redis_url, registry_path=registry, api_keys=[KEY], limits=LIMITS)
    with TestClient(create_app(settings)) as api:
        return api.get("/openapi.json").json()  # type: ignore[no-any-return]


def test_the_schema_states_the_limits_the_app_runs_with(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    classify, qa = components["ClassifyRequest"]["properties"], components["QARequest"]["properties"]
    assert classify["text"]["maxLength"] == 40 and classify["text"]["minLength"] == 1
    assert qa["question"]["maxLength"] == 40 and qa["context"]["maxLength"] == 120
    assert classify["timeout_s"]["maximum"] == 60 and qa["timeout_s"]["maximum"] == 60
    generation = components["GenerationOptions"]
    assert generation["properties"]["max_new_tokens"]["maximum"] == 16
    assert generation["properties"]["num_beams"]["maximum"] == 3
    assert generation["then"]["properties"]["temperature"]["minimum"] == 0.01  # with do_sample
    for name in ("ClassifyBulkRequest", "TranslateBulkRequest", "QABulkRequest"):
        assert components[name]["properties"]["requests"]["maxItems"] == 4
    submit = schema["paths"]["/v1/classify"]["post"]["responses"]
    assert "20000 bytes" in submit["413"]["description"] and "6 levels" in submit["400"]["description"]


def test_the_schema_states_the_registry_language_pairs(schema: dict[str, Any]) -> None:
    branches = schema["components"]["schemas"]["TranslateRequest"]["anyOf"]
    others, en_de, multi = branches
    assert others["allOf"][0] == {"properties": {"model": {"not": {"enum": ["en-de", "multi"]}}}}
    assert en_de["allOf"][0]["properties"]["model"] == {"const": "en-de"}

    def pairs(branch: dict[str, Any]) -> list[tuple[str, str]]:
        langs = [p["properties"] for p in branch["allOf"][1]["anyOf"]]
        return [(p["source_lang"]["enum"][0], p["target_lang"]["enum"][0]) for p in langs]

    assert pairs(others) == [("de", "fr"), ("en", "de"), ("fr", "de")]
    assert pairs(en_de) == [("en", "de")] and pairs(multi) == [("de", "fr"), ("fr", "de")]


def test_every_status_a_route_answers_is_declared(schema: dict[str, Any]) -> None:
    declared = {(m.upper(), p): set(op["responses"]) for p, ops in schema["paths"].items() for m, op in ops.items()}
    body = {"400", "401", "404", "413", "415", "422", "503"}
    for path in ("/v1/classify", "/v1/translate/bulk", "/v1/qa"):
        assert declared["POST", path] == {"202", *body}
    assert declared["GET", "/v1/tasks/{task_id}"] == {"200", "401", "404", "422", "503"}
    assert declared["GET", "/v1/tasks/{task_id}/stream"] == {"200", "401", "404", "422", "503"}
    assert declared["POST", "/v1/statuses"] == {"200", *body}
    assert declared["DELETE", "/v1/tasks/{task_id}"] == {"200", "401", "404", "409", "422", "503"}
    assert declared["GET", "/readyz"] == {"200", "503"}


@pytest.fixture()
def live_api(redis_url: str, registry: Path, tmp_path: Path) -> Iterator[str]:
    """`uvicorn pagedq.producer.api:app` as a child process, configured through the environment."""
    port = free_port()
    limits = {f"PAGEDQ_LIMITS__{name.upper()}": str(value) for name, value in LIMITS.model_dump().items()}
    env = {
        **os.environ,
        **limits,
        "PAGEDQ_REDIS_URL": redis_url,
        "PAGEDQ_REGISTRY_PATH": str(registry),
        "PAGEDQ_API_KEYS": KEY,
        "PAGEDQ_AUTH_ENABLED": "true",
    }
    log = (tmp_path / "api.log").open("wb")
    serve = ["pagedq.producer.api:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen([str(BIN / "uvicorn"), *serve], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, tmp_path / "api.log")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"uvicorn did not answer /healthz; see {log}")


def test_schemathesis_finds_nothing_on_the_live_api(live_api: str, tmp_path: Path) -> None:
    """Every phase (coverage, fuzzing, stateful) and every check, positive and negative data, fixed seed."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    command = [
        str(BIN / "st"),
        "--no-color",
        "--config-file",
        str(config),
        "run",
        f"{live_api}/openapi.json",
        "--header",
        f"X-API-Key: {KEY}",
        "--max-examples",
        "30",
        "--seed",
        "20261202",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    # warnings (e.g. "missing test data": random ids are unknown, so POST /v1/statuses is mostly 404) are not
    # failures; any check that fails is
    assert "Failures:" not in run.stdout and "Test cases:" in run.stdout, run.stdout[-8000:]
