"""compose.yaml and the Dockerfile cannot run here (no Docker engine): check what they promise by reading."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from repo_paths import ROOT

from pagedq.shared.celery_config import QUEUES

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_every_service_is_there_with_a_healthcheck() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"redis", "api", "worker", "flower", "prometheus", "grafana"}
    for name, service in services.items():
        assert "healthcheck" in service, name
    # monitoring only when asked for: `docker compose --profile monitoring up`
    assert {n for n, s in services.items() if "profiles" in s} == {"prometheus", "grafana"}
    assert all(services[n]["profiles"] == ["monitoring"] for n in ("prometheus", "grafana"))


def test_worker_reserves_a_gpu_and_waits_for_redis() -> None:
    worker = COMPOSE["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["PAGEDQ_REDIS_URL"] == "redis://redis:6379/0"


#: Where compose mounts the Redis password for every service, and the setting it becomes there.
PASSWORD_FILE = "/run/secrets/pagedq_redis_password"


def _secret_targets(service: dict) -> dict[str, str]:
    """secret name -> the file name it is mounted as under /run/secrets."""
    targets = {}
    for entry in service.get("secrets", []):
        name, target = (entry, entry) if isinstance(entry, str) else (entry["source"], entry.get("target"))
        targets[name] = target or name
    return targets


def test_secrets_are_files_never_environment_variables() -> None:
    """`docker inspect` shows a container's environment: no password, key or basic auth may be there."""
    secrets = COMPOSE["secrets"]
    assert set(secrets) == {"redis_password", "api_keys", "flower_basic_auth", "hf_token", "grafana_admin_password"}
    assert all(spec["file"].startswith("./secrets/") for spec in secrets.values())
    for name, service in COMPOSE["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith(("__FILE", "TOKEN_PATH")):  # a path to a secret file, not the secret
                assert str(value).startswith("/run/secrets/"), (name, key)
                continue
            assert not re.search(r"PASSWORD|API_KEYS|BASIC_AUTH|TOKEN$", key), (name, key)
            assert "${" not in str(value), (name, key)  # nothing interpolated from the host's environment
    assert "secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "secrets" in (ROOT / ".dockerignore").read_text().split()  # never sent to a build
    services = COMPOSE["services"]
    assert _secret_targets(services["api"])["api_keys"] == "pagedq_api_keys"  # PAGEDQ_API_KEYS, from its file
    assert _secret_targets(services["worker"])["hf_token"] == "hf_token"
    assert services["worker"]["environment"]["HF_TOKEN_PATH"] == "/run/secrets/hf_token"


def test_redis_requires_a_password_and_every_client_sends_it() -> None:
    redis = COMPOSE["services"]["redis"]
    script = " ".join(redis["command"][2:])
    assert redis["command"][:2] == ["sh", "-c"]
    # the password reaches redis-server in a config file only its user can read, not on its command line
    assert f"requirepass \"%s\"\\n' \"$$(cat {PASSWORD_FILE})\" > /tmp/auth.conf" in script
    assert "umask 077" in script and "redis-server /tmp/auth.conf" in script
    for flag, value in (("--appendonly", "yes"), ("--maxmemory-policy", "noeviction")):
        assert f"{flag} {value}" in script
    assert "redis-data:/data" in redis["volumes"]
    assert "ports" not in redis  # reachable on the compose network only
    for name in ("redis", "api", "worker", "flower"):
        assert _secret_targets(COMPOSE["services"][name])["redis_password"] == "pagedq_redis_password", name
    # Flower's broker is pagedq's own URL with the password put in, passed in its environment, not arguments
    dashboard = DOCKERFILE.split("AS dashboard")[1]
    assert "CELERY_BROKER_URL=" in dashboard and "Settings().redis_url" in dashboard and "-b " not in dashboard
    assert "FLOWER_BASIC_AUTH=" in dashboard and "/run/secrets/flower_basic_auth" in dashboard


def test_the_password_file_is_put_into_the_redis_urls(tmp_path: Path) -> None:
    """What every pagedq process does with /run/secrets/pagedq_redis_password (shared/settings.py)."""
    from redis.connection import parse_url

    from pagedq.shared.settings import Settings

    (tmp_path / "pagedq_redis_password").write_text("p@ss/w:rd\n")
    (tmp_path / "pagedq_api_keys").write_text("k1, k2\n")
    settings = Settings(_secrets_dir=tmp_path, redis_url="redis://redis:6379/0",  # type: ignore[call-arg]
                        result_redis_url="redis://:own@results:6379/1")
    assert parse_url(settings.redis_url) == {"password": "p@ss/w:rd", "host": "redis", "port": 6379, "db": 0}
    assert settings.result_redis_url == "redis://:own@results:6379/1"  # a URL with its own password keeps it
    assert settings.api_keys == ["k1", "k2"]
    assert "p@ss" not in repr(settings)


def test_the_redis_healthcheck_authenticates() -> None:
    """`redis-cli ping` exits 0 even when refused (NOAUTH): the check must log in and see PONG."""
    test = COMPOSE["services"]["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "redis-cli ping" in test[1] and "grep -q PONG" in test[1]
    assert f"REDISCLI_AUTH=\"$$(cat {PASSWORD_FILE})\"" in test[1]  # redis-cli reads its password here


def test_images_install_dependencies_before_the_source() -> None:
    """A code change rebuilds only the layers after `COPY shared` (torch and the requirements stay cached);
    the worker's Hugging Face cache belongs to its user."""
    for target, extra in (("api", "api"), ("worker", "worker"), ("dashboard", "dashboard")):
        stage = DOCKERFILE.split(f"AS {target}")[1].split("\nFROM")[0]
        requirements = stage.index(f"python requirements.py {extra}")
        assert requirements < stage.index("COPY shared") < stage.index("pip install --no-deps .")
    worker = DOCKERFILE.split("AS worker")[1].split("\nFROM")[0]
    assert worker.index('pip install "${TORCH_SPEC}"') < worker.index("python requirements.py worker")
    assert "chown pagedq:pagedq /hf-cache" in worker and worker.index("/hf-cache") < worker.index("USER pagedq")
    assert "hf-cache:/hf-cache" in COMPOSE["services"]["worker"]["volumes"]


def test_the_image_requirements_come_from_pyproject() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docker_requirements", ROOT / "docker" / "requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    api, worker = module.requirements(project, ["api"]), module.requirements(project, ["worker"])
    assert set(project["dependencies"]) <= set(api) and not [r for r in api if r.startswith("torch")]
    assert any(r.startswith("torch") for r in worker)
    dev = module.requirements(project, ["dev"])  # `pagedq[api,worker,dashboard]` inside an extra is expanded
    assert any(r.startswith("flower") for r in dev) and not [r for r in dev if r.startswith("pagedq")]


def test_only_the_api_and_flower_are_published_to_the_host() -> None:
    published = {name: s["ports"] for name, s in COMPOSE["services"].items() if "ports" in s}
    loopback = {name: ports for name, ports in published.items() if all(p.startswith("127.0.0.1:") for p in ports)}
    assert {n: p for n, p in published.items() if n not in loopback} == {"api": ["8000:8000"], "flower": ["5555:5555"]}
    assert set(loopback) == {"prometheus", "grafana"}
    assert COMPOSE["services"]["worker"]["expose"] == ["9464"]  # metrics for scrapers on the compose network


def test_build_targets_exist_and_worker_runs_the_threads_pool_on_every_queue() -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\w+)", DOCKERFILE, flags=re.M))
    for name in ("api", "worker", "flower"):
        assert COMPOSE["services"][name]["build"]["target"] in targets
    worker_cmd = DOCKERFILE.split("AS worker")[1].split("FROM")[0]
    assert '"-P", "threads"' in worker_cmd
    assert ",".join(QUEUES.values()) in worker_cmd
    assert "python requirements.py api >" in DOCKERFILE.split("AS api")[1].split("FROM")[0]  # no torch in the API
    assert re.search(r"apt-get install .*\bgcc\b", worker_cmd)  # the native CPU decode kernel is built on first use


def test_the_native_kernel_source_ships_with_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "*.c" in project["tool"]["setuptools"]["package-data"]["pagedq.worker.engine.cpu.native"]
    assert (ROOT / "worker" / "engine" / "cpu" / "native" / "paged_decode.c").is_file()


def test_the_api_requires_keys() -> None:
    api_env = COMPOSE["services"]["api"]["environment"]
    assert api_env["PAGEDQ_AUTH_ENABLED"] == "true" and "PAGEDQ_API_KEYS" not in api_env  # from its secret file


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


def test_the_grafana_dashboard_charts_only_metrics_the_workers_export() -> None:
    """docker/monitoring: Prometheus scrapes the workers, Grafana provisions it and the pagedq dashboard, and
    every query of the dashboard names a metric worker/metrics.py serves (a renamed metric breaks this)."""
    import json

    from prometheus_client import Counter, Histogram

    from pagedq.worker import metrics

    exported = {m._name for m in vars(metrics).values() if isinstance(m, Counter | Histogram)}
    exported |= {name for name, _, _ in metrics.ENGINE_METRICS.values()}
    exported |= {name for name, _ in metrics.THREAD_METRICS.values()}
    monitoring = ROOT / "docker" / "monitoring"
    dashboard = json.loads((monitoring / "grafana" / "dashboards" / "pagedq.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for q in queries for m in re.findall(r"pagedq_\w+", q)}
    assert used and used <= exported, used - exported
    assert {"pagedq_tasks", "pagedq_e2e_request_latency_seconds", "pagedq_generation_tokens"} <= used
    prometheus = yaml.safe_load((monitoring / "prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["dns_sd_configs"][0]["names"] == ["worker"] and job["dns_sd_configs"][0]["port"] == 9464
    grafana = COMPOSE["services"]["grafana"]
    assert "./docker/monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    provider = yaml.safe_load((monitoring / "grafana" / "provisioning" / "dashboards" / "pagedq.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    provisioning = monitoring / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
