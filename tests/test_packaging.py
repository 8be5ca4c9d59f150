"""The installed layout: one top-level package, `pagedq` (shared/, producer/, worker/ of the repository are
pagedq.shared, pagedq.producer and pagedq.worker), so apps with packages of those common names still work."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from repo_paths import ROOT


def test_the_wheel_holds_only_the_pagedq_package(tmp_path: Path) -> None:
    # built from a copy of the sources: setuptools builds in the source tree and reuses its build/ directory,
    # where a module removed since the last build would linger
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for d in ("shared", "producer", "worker"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(src)], check=True, timeout=300, capture_output=True)
    [wheel] = tmp_path.glob("pagedq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"pagedq"}
    assert not any(name.startswith("pagedq/__init__") for name in names)  # a namespace: nothing of its own
    packaged = {name for name in names if name.endswith((".py", ".c"))}
    sources = {f"pagedq/{p.relative_to(ROOT).as_posix()}" for d in ("shared", "producer", "worker")
               for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".c") and "__pycache__" not in p.parts}
    assert sources == packaged, sorted(sources ^ packaged)  # every module ships, the native kernel's source too


def test_an_app_with_its_own_shared_and_worker_packages_imports_the_client(tmp_path: Path) -> None:
    """Before the namespace, `from producer.client import Client` failed in such an app with
    "No module named 'shared.errors'"."""
    for name in ("shared", "worker", "producer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'the app: {name}'\n")
    code = ("import shared, worker, producer\n"
            "from pagedq.producer.client import Client\n"
            "from pagedq.shared.errors import ModelNotFound\n"
            "assert shared.WHO == 'the app: shared' and worker.WHO == 'the app: worker', (shared, worker)\n"
            "print(Client.__module__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "pagedq.producer.client"
