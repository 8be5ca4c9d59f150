"""Fixtures for the engine tests (helpers live in `helpers.py`)."""

from __future__ import annotations

import pytest

from worker.engine.helpers import BUILDERS, TinyModel, build_tiny


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, TinyModel]:
    return {name: build_tiny(name) for name in BUILDERS}
