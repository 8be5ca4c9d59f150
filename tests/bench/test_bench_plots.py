"""The benchmarks' plots (bench/plots.py): each draws a valid PNG from a few rows shaped like its script's, and
every script's `--plot` defaults into bench/plots/ (the README shows those files). No benchmark runs here."""

from __future__ import annotations

import argparse
import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest
from repo_paths import BENCH

sys.path.insert(0, str(BENCH))  # the scripts import their siblings by bare name, as `python bench/x.py` does

import plots  # noqa: E402

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, line: str) -> None:
    """A PNG signature, an IHDR of a plausible size, an IEND at the end; and the line says where it went."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", data[16:24])
    assert 300 <= width <= 3000 and 150 <= height <= 2000
    assert line == f"plot: {path}"


W1 = plots.Panel(
    "ratio: to transformers continuous batching",
    [("sequential generate", 49.0), ("static batches of 16", 175.0), ("transformers continuous batching", 136.0),
     ("pagedq fp32", 518.0), ("pagedq bf16", 541.0)],
    "transformers continuous batching",
)  # fmt: skip
W2 = plots.Panel("ratio: to the cache off", [("pagedq prefix cache on", 496.0), ("pagedq prefix cache off", 72.0)],
                 "pagedq prefix cache off")  # fmt: skip
W3 = [
    plots.Panel("fp32", [("one forward per text", 5.06), ("pipeline batch_size=32 fp32", 3.38),
                         ("pagedq packed", 7.64), ("pagedq padded (bucketed)", 7.33)], "pipeline batch_size=32 fp32"),
    plots.Panel("bf16", [("pipeline batch_size=32 bf16", 7.09), ("pagedq packed bf16", 13.89)],
                "pipeline batch_size=32 bf16"),
]  # fmt: skip
W4_SYSTEMS = ["one generate per sentence", "generate, batches of 16", "pagedq engine"]
W4 = [
    plots.Panel("greedy", list(zip(W4_SYSTEMS, [36.4, 152.1, 761.0], strict=True)), "generate, batches of 16"),
    plots.Panel("beam 4", list(zip(W4_SYSTEMS, [23.3, 49.2, 214.1], strict=True)), "generate, batches of 16"),
]


@pytest.mark.parametrize("panels", [[W1], [W2], W3, W4], ids=["w1", "w2", "w3", "w4"])
def test_rates_plot_is_a_png(tmp_path: Path, panels: list[plots.Panel]) -> None:
    path = tmp_path / "sub" / "w.png"  # a missing folder is made
    assert_png(path, plots.rates(path, "W: a workload", "tokens/s", panels, "--quick: 16 requests"))


def test_ratio_is_to_the_panel_baseline() -> None:
    assert W1.ratio(518.0) == pytest.approx(518 / 136)
    assert W3[1].ratio(13.89) == pytest.approx(13.89 / 7.09)


def test_rates_panels_wrap_into_rows_of_columns(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"  # five panels of different systems, three to a row: one cell left empty
    assert_png(path, plots.rates(path, "W: five panels", "runs/s", [W1, W2, *W3, W4[0]], columns=3))


def test_service_plot_is_a_png(tmp_path: Path) -> None:
    from w5_load import Outcome, Sample
    from w5_report import Row

    rows = [
        Row("classifier executor in-process (no queue)", Outcome(0.4, [Sample(0.0)] * 2000), None, 62.5),
        Row("pagedq single-item, Client", Outcome(12.3, [Sample(0.1 + i / 1e4) for i in range(2000)]), 32, 6.2),
        Row("Celery no-op, open loop", Outcome(6.7, []), None),  # no latencies: NaN bars
    ]
    path = tmp_path / "w5.png"
    assert_png(path, plots.service(rows, path))


def test_faults_plot_is_a_png(tmp_path: Path) -> None:
    from _faults_support import Row

    rows = [
        Row("worker SIGKILL, a new worker started", submitted=1000, succeeded=998, cancelled=2, recover_s=3.4),
        Row("worker SIGTERM (warm shutdown)", submitted=1000, succeeded=990, cancelled=10, recover_s=0.0),
        Row("4 SIGKILLs 3 s apart", submitted=1000, lost=3, flips=1, recover_s=26.8, never_recovered=2),
        Row("Redis SIGKILL and restart (AOF)", submitted=1000, recover_s=None),
    ]
    path = tmp_path / "faults.png"
    assert_png(path, plots.faults(rows, path, "1000 tasks per fault"))


def test_without_matplotlib_the_plot_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    path = tmp_path / "w1.png"
    assert plots.rates(path, "W1", "tok/s", [W1]) == plots.SKIPPED
    assert plots.faults([], path) == plots.SKIPPED
    assert not path.exists()


def load_script(name: str) -> ModuleType:
    """bench/<name>.py under a name of its own: a bare `engine` could be another test package in a whole-suite run."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "paths"),
    [
        ("engine", {"w1": "w1.png", "w2": "w2.png"}),
        ("tasks", {"w3": "w3.png", "w4": "w4.png"}),
        ("w4_translation", {"w4": "w4.png"}),
        ("service", {"w5": "w5.png"}),
        ("faults", {"faults": "faults.png"}),
        ("precision", {"precision": "precision.png"}),
    ],
)
def test_plot_defaults_into_bench_plots(script: str, paths: dict[str, str]) -> None:
    """Each script's `parser()` (what `main` parses) has `--plot` default to bench/plots/<workload>.png."""
    parser: argparse.ArgumentParser = load_script(script).parser()
    default = parser.parse_args([]).plot
    for workload, name in paths.items():
        assert plots.path_for(default, workload) == BENCH / "plots" / name
