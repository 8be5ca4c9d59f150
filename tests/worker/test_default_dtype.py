"""The registry's `dtype = "auto"` on CPU: bf16 where the CPU has AMX, fp32 elsewhere; explicit dtypes win.

The choice follows the CPU the worker runs on (`worker.registry.cpu_has_fast_bf16`), read here against the
kernel's own CPU flags, and a model loaded with `auto` is in the dtype that was chosen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pagedq.shared.models import TaskType
from pagedq.shared.registry import ModelSpec, Registry
from pagedq.worker import registry as worker_registry
from pagedq.worker.registry import cpu_has_fast_bf16, load_model, resolve_dtype

CPU = torch.device("cpu")


def spec(dtype: str) -> ModelSpec:
    return ModelSpec(task=TaskType.CLASSIFY, source="x", dtype=dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize(("amx", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_is_bf16_only_with_amx(monkeypatch: pytest.MonkeyPatch, amx: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(worker_registry, "cpu_has_fast_bf16", lambda: amx)
    assert resolve_dtype(spec("auto"), CPU) == expected
    assert resolve_dtype(spec("float32"), CPU) == torch.float32  # an explicit dtype always wins
    assert resolve_dtype(spec("bfloat16"), CPU) == torch.bfloat16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_amx_detection_agrees_with_the_cpu_flags() -> None:
    flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    assert cpu_has_fast_bf16() == ("amx_tile" in flags and "amx_bf16" in flags)


def test_a_model_loaded_with_auto_has_the_chosen_dtype(demo_models: Path) -> None:
    registry = Registry.load(demo_models)
    entry = registry.models["demo-classifier"]
    auto = ModelSpec.model_validate({**entry.model_dump(), "dtype": "auto"})
    loaded = load_model(auto, registry, "cpu")
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert loaded.dtype == expected
    assert next(loaded.model.parameters()).dtype == expected
