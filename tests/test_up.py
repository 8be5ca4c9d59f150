"""`make up` (scripts/up.py) as a user meets it: fixed ports that the README's examples use, a clear refusal of a
taken port, a dead child reported and the stack stopped, Ctrl-C stopping in dependency order; and the model
choice of scripts/models.py without a slow hub probe. The launcher runs as a real process on free ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from repo_paths import ROOT

from pagedq.shared.redis_server import free_port
from scripts import models, up

README = (ROOT / "README.md").read_text()
PORT_VARIABLES = [p.env for p in up.PORTS]


class Launcher:
    """`python -m scripts.up` in its own session, as a terminal runs it; its output collected line by line."""

    def __init__(self, tmp_path: Path, registry: Path, *args: str) -> None:
        self.ports = {p.flag: free_port() for p in up.PORTS}
        env = {k: v for k, v in os.environ.items() if k not in PORT_VARIABLES}
        env.update(PAGEDQ_REGISTRY_PATH=str(registry), PAGEDQ_DRAIN_TIMEOUT_S="5")
        argv = [a for flag, port in self.ports.items() for a in (flag, str(port))]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.up", *argv, "--log-dir", str(tmp_path / "logs"), *args], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.logs = tmp_path / "logs"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output:
            assert self.proc.poll() is None or text in self.output, f"make up exited:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout_s} s:\n{self.output}"
            time.sleep(0.2)

    def children(self) -> dict[str, int]:
        """pid of each child of the launcher, by the name it runs as (worker1, api, flower, redis)."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(fields[1]) != self.proc.pid:
                continue
            name = ("worker1" if "worker1@" in cmdline else "api" if "uvicorn" in cmdline
                    else "flower" if "flower" in cmdline else "redis" if "redis-server" in cmdline else cmdline)
            found[name] = int(stat.parent.name)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)


@pytest.fixture()
def launch(tmp_path: Path, demo_models: Path) -> Iterator[Callable[..., Launcher]]:
    started: list[Launcher] = []

    def start(*args: str) -> Launcher:
        launcher = Launcher(tmp_path, demo_models, *args)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.stop()


def gone(pid: int) -> bool:
    """No such process, not even a zombie."""
    return not Path(f"/proc/{pid}").exists()


# --- fixed ports, as the README writes them ---------------------------------------------------------------


def test_defaults_are_the_ports_and_key_the_readme_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [*PORT_VARIABLES, "PAGEDQ_API_KEY"]:
        monkeypatch.delenv(variable, raising=False)
    args = up.parse_args([])
    assert (args.api_port, args.redis_port, args.flower_port, args.metrics_port) == (8000, 6380, 5555, 9464)
    assert args.api_key == "secret"
    assert 'Client("redis://localhost:6380/0")' in README and "6379/0\")" not in README.split("## HTTP API")[0]
    assert 'HTTPClient("http://localhost:8000", api_key="secret")' in README
    assert "curl -s -XPOST localhost:8000/v1/classify -H 'X-API-Key: secret'" in README
    assert "export PAGEDQ_REDIS_URL=redis://localhost:6380/0" in README
    for variable in [*PORT_VARIABLES, "PAGEDQ_API_KEY", "PAGEDQ_DEMO_MODELS"]:
        assert variable in README, variable


def test_ports_and_key_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDQ_API_PORT", "8123")
    monkeypatch.setenv("PAGEDQ_REDIS_PORT", "6390")
    monkeypatch.setenv("PAGEDQ_API_KEY", "k2")
    args = up.parse_args(["--flower-port", "5600"])
    assert (args.api_port, args.redis_port, args.flower_port, args.api_key) == (8123, 6390, 5600, "k2")


def test_a_taken_port_is_named_with_the_variable_that_changes_it(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in PORT_VARIABLES}
        env.update(PAGEDQ_API_PORT=str(taken), PAGEDQ_REDIS_PORT=str(free_port()), PAGEDQ_FLOWER_PORT=str(free_port()),
                   PAGEDQ_METRICS_PORT=str(free_port()))
        done = subprocess.run([sys.executable, "-m", "scripts.up"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2
    assert f"port {taken} (the HTTP API) is already in use" in done.stderr
    assert "PAGEDQ_API_PORT=N make up (or --api-port N)" in done.stderr
    assert "Starting" not in done.stdout  # refused before anything started


def test_one_port_for_two_processes_is_refused() -> None:
    port = free_port()
    problems = up.port_problems(up.parse_args(["--api-port", str(port), "--flower-port", str(port),
                                               "--redis-port", str(free_port()), "--metrics-port", str(free_port())]))
    assert len(problems) == 1 and f"port {port} is given to both the HTTP API and Flower" in problems[0]


# --- processes: a death reported, Ctrl-C in order -----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("victim", ["worker1", "redis"])
def test_a_killed_child_is_reported_and_the_stack_stops_without_zombies(launch: Callable[..., Launcher],
                                                                        victim: str) -> None:
    launcher = launch()
    launcher.wait_for("pagedq is up", 120)
    assert "worker1 is ready" in launcher.output
    children = launcher.children()
    assert set(children) == {"worker1", "api", "flower", "redis"}, children
    os.kill(children[victim], signal.SIGKILL)
    assert launcher.proc.wait(60) == 1
    out = launcher.output
    assert f"{victim} exited (killed by SIGKILL)" in out
    assert "stopping the whole stack" in out and out.rstrip().endswith("stopped")
    assert all(gone(pid) for pid in children.values()), launcher.children()


@pytest.mark.integration
def test_ctrl_c_stops_api_and_flower_then_the_worker_then_redis(launch: Callable[..., Launcher]) -> None:
    """The README's client examples run against it first (only the ports differ from `make up`'s defaults)."""
    launcher = launch()
    launcher.wait_for("pagedq is up", 120)
    run_readme_examples(launcher)
    children = launcher.children()
    os.killpg(launcher.proc.pid, signal.SIGINT)  # what the terminal does: its process group only
    assert launcher.proc.wait(60) == 0
    out = launcher.output
    order = [out.index(s) for s in ("Stopping api, flower", "Stopping worker1 (warm shutdown", "Stopping Redis",
                                    "\nstopped")]
    assert order == sorted(order), out
    worker_log = (launcher.logs / "worker1.log").read_text()
    assert "Warm shutdown" in worker_log  # SIGTERM, not SIGKILL; and no error talking to Redis on the way out
    assert "Traceback" not in worker_log and "ConnectionError" not in worker_log, worker_log[-3000:]
    assert all(gone(pid) for pid in children.values())


def run_readme_examples(launcher: Launcher) -> None:
    api, redis_port = launcher.ports["--api-port"], launcher.ports["--redis-port"]
    python = README.split("```python\n", 1)[1].split("```", 1)[0]
    python = python.replace("localhost:8000", f"localhost:{api}").replace("localhost:6380", f"localhost:{redis_port}")
    done = subprocess.run([sys.executable, "-c", python], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    curl = re.search(r"(curl -s -XPOST localhost:8000/v1/classify .*?\n.*?)\n", README)
    assert curl is not None
    command = curl.group(1).replace("\\\n", " ").replace("localhost:8000", f"localhost:{api}")
    answer = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
    assert '"state":"queued"' in answer.stdout.replace(" ", ""), answer
    cli = subprocess.run([str(Path(sys.executable).parent / "pagedq"), "classify", "I loved it", "--wait"],
                         env={**os.environ, "PAGEDQ_REDIS_URL": f"redis://localhost:{redis_port}/0"},
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and '"succeeded"' in cli.stdout, cli


# --- the model choice: fast, skippable, said out loud ---------------------------------------------------------


@pytest.fixture()
def no_hub(monkeypatch: pytest.MonkeyPatch, demo_models: Path) -> list[str]:
    """The built demo models as DEMO_DIR; every hub probe recorded (none answers)."""
    probes: list[str] = []
    monkeypatch.delenv("PAGEDQ_REGISTRY_PATH", raising=False)
    monkeypatch.setattr(models, "DEMO_DIR", demo_models.parent)
    monkeypatch.setattr(models.httpx, "head", lambda url, **_: probes.append(url) or (_ for _ in ()).throw(
        models.httpx.ConnectError("offline")))
    return probes


def test_demo_models_are_chosen_without_asking_the_hub(monkeypatch: pytest.MonkeyPatch, no_hub: list[str],
                                                       demo_models: Path) -> None:
    monkeypatch.setenv("PAGEDQ_DEMO_MODELS", "demo")
    said: list[str] = []
    chosen = models.choose_registry(said.append)
    assert chosen == models.Models(demo_models, is_demo=True) and no_hub == []
    assert "RANDOM-WEIGHT" in said[0] and "PAGEDQ_DEMO_MODELS=hub" in said[0]


def test_auto_asks_the_hub_once_briefly_and_says_so(monkeypatch: pytest.MonkeyPatch, no_hub: list[str],
                                                    demo_models: Path) -> None:
    monkeypatch.delenv("PAGEDQ_DEMO_MODELS", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "missing_from_cache", lambda _: ["org/model"])
    said: list[str] = []
    started = time.monotonic()
    assert models.choose_registry(said.append).is_demo
    assert time.monotonic() - started < 5 and len(no_hub) == 1
    assert "asking the hub" in said[0] and "PAGEDQ_DEMO_MODELS=demo skips this" in said[0]


def test_hf_hub_offline_means_no_request(monkeypatch: pytest.MonkeyPatch, no_hub: list[str]) -> None:
    monkeypatch.delenv("PAGEDQ_DEMO_MODELS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "missing_from_cache", lambda _: ["org/model"])
    assert models.choose_registry(lambda _: None).is_demo and no_hub == []


def test_hub_models_that_are_missing_are_announced_as_downloading(monkeypatch: pytest.MonkeyPatch,
                                                                  no_hub: list[str]) -> None:
    monkeypatch.setenv("PAGEDQ_DEMO_MODELS", "hub")
    monkeypatch.setattr(models, "missing_from_cache", lambda _: ["org/model"])
    said: list[str] = []
    chosen = models.choose_registry(said.append)
    assert chosen == models.Models(models.DEFAULT_REGISTRY, is_demo=False) and no_hub == []
    assert any("DOWNLOADING 1 models" in s and "org/model" in s for s in said)


def test_cached_models_offline_load_without_the_network(monkeypatch: pytest.MonkeyPatch, no_hub: list[str]) -> None:
    monkeypatch.delenv("PAGEDQ_DEMO_MODELS", raising=False)
    monkeypatch.setattr(models, "missing_from_cache", lambda _: [])
    chosen = models.choose_registry(lambda _: None)
    assert chosen.env == {"HF_HUB_OFFLINE": "1"} and not chosen.is_demo


def test_an_unknown_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGEDQ_REGISTRY_PATH", raising=False)
    monkeypatch.setenv("PAGEDQ_DEMO_MODELS", "real")
    with pytest.raises(SystemExit, match="auto, hub, demo"):
        models.choose_registry(lambda _: None)


def test_ports_picked_before_any_server_binds_are_all_different() -> None:
    """`make up` picks the API, Flower and metrics ports before its children bind them; the kernel may offer a
    just-probed port again, so free_port must never hand the same port out twice (CI once gave the API and
    Flower one port)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
