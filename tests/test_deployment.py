"""compose.yaml and the Dockerfile cannot run here (no Docker engine): check what they promise by reading."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from shared.celery_config import QUEUES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_every_service_is_there_with_a_healthcheck() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"redis", "api", "worker", "flower"}
    for name, service in services.items():
        assert "healthcheck" in service, name


def test_redis_keeps_messages() -> None:
    command = COMPOSE["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data:/data" in COMPOSE["services"]["redis"]["volumes"]


def test_worker_reserves_a_gpu_and_waits_for_redis() -> None:
    worker = COMPOSE["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["PAGEDQ_REDIS_URL"].endswith("@redis:6379/0")


#: How compose.yaml names the Redis password: required (`:?`), never defaulted.
PASSWORD = "${REDIS_PASSWORD:?"


def test_redis_requires_a_password_and_every_client_sends_it() -> None:
    redis = COMPOSE["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1].startswith(PASSWORD)
    assert "ports" not in redis  # reachable on the compose network only
    for name in ("api", "worker", "flower"):
        url = COMPOSE["services"][name]["environment"]["PAGEDQ_REDIS_URL"]
        assert url.startswith("redis://:" + PASSWORD) and url.endswith("@redis:6379/0"), name
    # Flower's broker is that URL, passed in its environment rather than its arguments.
    dashboard = DOCKERFILE.split("AS dashboard")[1]
    assert 'CELERY_BROKER_URL=\\"$PAGEDQ_REDIS_URL\\"' in dashboard and "-b " not in dashboard


def test_the_redis_healthcheck_authenticates() -> None:
    """`redis-cli ping` exits 0 even when refused (NOAUTH): the check must log in and see PONG."""
    redis = COMPOSE["services"]["redis"]
    assert redis["environment"]["REDISCLI_AUTH"].startswith(PASSWORD)  # redis-cli reads its password here
    test = redis["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "redis-cli ping" in test[1] and "grep -q PONG" in test[1]


def test_only_the_api_and_flower_are_published_to_the_host() -> None:
    published = {name: s["ports"] for name, s in COMPOSE["services"].items() if "ports" in s}
    assert published == {"api": ["8000:8000"], "flower": ["5555:5555"]}
    assert COMPOSE["services"]["worker"]["expose"] == ["9464"]  # metrics for scrapers on the compose network


def test_build_targets_exist_and_worker_runs_the_threads_pool_on_every_queue() -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\w+)", DOCKERFILE, flags=re.M))
    for name in ("api", "worker", "flower"):
        assert COMPOSE["services"][name]["build"]["target"] in targets
    worker_cmd = DOCKERFILE.split("AS worker")[1].split("FROM")[0]
    assert '"-P", "threads"' in worker_cmd
    assert ",".join(QUEUES.values()) in worker_cmd
    assert 'pip install ".[api]"' in DOCKERFILE.split("AS api")[1].split("FROM")[0]  # no torch in the API image
    assert re.search(r"apt-get install .*\bgcc\b", worker_cmd)  # the native CPU decode kernel is built on first use


def test_the_native_kernel_source_ships_with_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "*.c" in project["tool"]["setuptools"]["package-data"]["worker.engine.native"]
    assert (ROOT / "worker" / "engine" / "native" / "paged_decode.c").is_file()


def test_secrets_are_required_not_defaulted() -> None:
    api_env = COMPOSE["services"]["api"]["environment"]
    assert api_env["PAGEDQ_AUTH_ENABLED"] == "true"
    assert api_env["PAGEDQ_API_KEYS"].startswith("${PAGEDQ_API_KEYS:?")
    assert COMPOSE["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


def test_a_client_only_install_pulls_no_torch() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    heavy = ("torch", "transformers", "tokenizers", "safetensors")
    assert not [d for d in project["dependencies"] if d.startswith(heavy)]
    assert not [d for d in project["optional-dependencies"]["api"] if d.startswith(heavy)]
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["worker"])


def test_the_worker_drains_within_its_grace_period() -> None:
    """Docker SIGKILLs a container stop_grace_period after SIGTERM: the drain must end well before that, so
    the worker hands the rest back and exits by itself."""
    worker = COMPOSE["services"]["worker"]
    drain_s = float(worker["environment"]["PAGEDQ_DRAIN_TIMEOUT_S"])
    grace = worker["stop_grace_period"]
    assert grace.endswith("s")
    assert drain_s + 30 <= float(grace[:-1])


def test_the_build_context_leaves_out_what_the_images_do_not_copy() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".demo", ".models", "**/__pycache__"} <= ignored
    copied = re.findall(r"^COPY (\S+)", DOCKERFILE, flags=re.M)
    assert not ignored & set(copied)


def test_the_worker_pool_size_comes_from_the_settings() -> None:
    worker_cmd = DOCKERFILE.split("AS worker")[1].split("FROM")[0]
    assert '"-c"' not in worker_cmd and "--concurrency" not in worker_cmd  # PAGEDQ_WORKER_CONCURRENCY decides
