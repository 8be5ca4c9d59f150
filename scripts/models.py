"""Pick the registry a local stack serves: the user's, the real models of `models.toml`, or demo models.

`PAGEDQ_DEMO_MODELS` chooses: `auto` (default) serves models.toml when its models are in the local Hugging Face
cache or the hub answers one HEAD request within `HUB_TIMEOUT_S`, else demo models; `hub` serves models.toml
without asking (downloading what is missing); `demo` builds tiny random-weight models offline without asking
the hub. `PAGEDQ_REGISTRY_PATH` wins over all of them.
"""

from __future__ import annotations

import ast
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pagedq.shared.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REGISTRY = ROOT / "models.toml"
DEMO_DIR = ROOT / ".models" / "demo"
DEMO_BUILDER = ROOT / "worker" / "demo" / "models.py"
HUB_TIMEOUT_S = 3.0
CHOICES = ("auto", "hub", "demo")


@dataclass(frozen=True)
class Models:
    """What the stack serves. `env`: variables for its processes (HF_HUB_OFFLINE=1 when everything is cached
    and the hub does not answer, so loading never waits on the network)."""

    registry_path: Path
    is_demo: bool
    env: dict[str, str] = field(default_factory=dict)


def missing_from_cache(registry_path: Path) -> list[str]:
    """Hub ids of the registry's models whose config is neither a local path nor in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    registry = Registry.load(registry_path)
    missing = []
    for spec in registry.models.values():
        source = registry.resolve_source(spec)
        if Path(source).exists():
            continue
        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            missing.append(source)
    return missing


def hub_answers(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """One HEAD request to the hub (HF_ENDPOINT), unless HF_HUB_OFFLINE says not to ask."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        return httpx.head(endpoint, timeout=timeout_s).status_code < 500
    except httpx.HTTPError:
        return False


def choose_registry(say: Callable[[str], None] = print) -> Models:
    """PAGEDQ_REGISTRY_PATH wins; then PAGEDQ_DEMO_MODELS (see the module docstring)."""
    configured = os.environ.get("PAGEDQ_REGISTRY_PATH")
    if configured:
        say(f"Serving the models of {configured} (PAGEDQ_REGISTRY_PATH).")
        return Models(Path(configured), is_demo=False)
    choice = os.environ.get("PAGEDQ_DEMO_MODELS", "auto").lower()
    if choice not in CHOICES:
        raise SystemExit(f"PAGEDQ_DEMO_MODELS={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "demo":
        return demo_models(say, "PAGEDQ_DEMO_MODELS=demo")
    missing = missing_from_cache(DEFAULT_REGISTRY)
    if choice == "hub" or not missing:
        return hub_models(say, missing, offline=not missing and not hub_answers())
    say(f"{len(missing)} models of {DEFAULT_REGISTRY.name} are not in the Hugging Face cache: asking the hub "
        f"({HUB_TIMEOUT_S:.0f} s at most; PAGEDQ_DEMO_MODELS=demo skips this) ...")
    if hub_answers():
        return hub_models(say, missing, offline=False)
    return demo_models(say, "the hub did not answer")


def hub_models(say: Callable[[str], None], missing: list[str], offline: bool) -> Models:
    say(f"Serving the real models of {DEFAULT_REGISTRY.name}.")
    if missing:
        say(f"DOWNLOADING {len(missing)} models from the Hugging Face hub (first run only; about 2 GB in all): "
            f"{', '.join(missing)}. The worker fetches them while it starts; its log shows the progress.")
    return Models(DEFAULT_REGISTRY, is_demo=False, env={"HF_HUB_OFFLINE": "1"} if offline else {})


def demo_models(say: Callable[[str], None], why: str) -> Models:
    where = DEMO_DIR.relative_to(ROOT) if DEMO_DIR.is_relative_to(ROOT) else DEMO_DIR
    say(f"Demo models ({why}): tiny RANDOM-WEIGHT models built offline into {where}. They "
        "run the real code paths, but their outputs are MEANINGLESS. PAGEDQ_DEMO_MODELS=hub serves models.toml.")
    built = built_demo_registry(DEMO_DIR)
    if built is not None:
        return Models(built, is_demo=True)
    say("Building the demo models (first run; loads torch, a few seconds) ...")
    started = time.perf_counter()
    from pagedq.worker.demo.models import build_demo_models

    path = build_demo_models(DEMO_DIR)
    say(f"Demo models built ({time.perf_counter() - started:.1f} s).")
    return Models(path, is_demo=True)


def built_demo_registry(out_dir: Path) -> Path | None:
    """The registry of a complete demo build in `out_dir`, else None: worker.demo_models' own test (its marker
    holds DEMO_MODELS_VERSION) without importing that module, which imports torch and transformers -- seconds
    the launcher need not spend (the worker loads them anyway)."""
    source = DEMO_BUILDER.read_text()
    constants = {target.id: node.value.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant)}
    marker, registry = out_dir / str(constants.get("BUILD_MARKER")), out_dir / str(constants.get("REGISTRY_FILE"))
    version = constants.get("DEMO_MODELS_VERSION")
    built = version is not None and marker.is_file() and marker.read_text().strip() == version
    return registry if built and registry.is_file() else None
