"""Pick the registry a local stack serves: the user's, the real models of `models.toml`, or demo models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REGISTRY = ROOT / "models.toml"
DEMO_DIR = ROOT / ".models" / "demo"

_PROBE = """
import sys
from transformers import AutoConfig
for source in sys.argv[1:]:
    AutoConfig.from_pretrained(source)
"""


def reachable(registry_path: Path, timeout_s: float = 60.0) -> bool:
    """True when every model's config loads (from a local path, the HF cache, or the hub)."""
    registry = Registry.load(registry_path)
    sources = [registry.resolve_source(s) for s in registry.models.values()]
    env = {**os.environ, "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, *sources], env=env, timeout=timeout_s,
                              capture_output=True)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def choose_registry(say: callable = print) -> tuple[Path, bool]:  # type: ignore[valid-type]
    """(registry path, is_demo). PAGEDQ_REGISTRY_PATH wins; then models.toml if reachable; else demo models."""
    configured = os.environ.get("PAGEDQ_REGISTRY_PATH")
    if configured:
        return Path(configured), False
    if reachable(DEFAULT_REGISTRY):
        say(f"Serving the real models of {DEFAULT_REGISTRY.name}.")
        return DEFAULT_REGISTRY, False
    from worker.demo_models import build_demo_models

    say("The models of models.toml cannot be reached (no network or cache): building tiny RANDOM-WEIGHT demo "
        "models offline. They run the real code paths, but their outputs are MEANINGLESS.")
    return build_demo_models(DEMO_DIR), True
