"""Session fixtures: a private redis-server on a free port; tiny random-weight models on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pagedq.shared.redis_server import LocalRedis

# Tests build their own models offline; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    """A redis-server started for this test session only (never the machine's shared one)."""
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: LocalRedis) -> Iterator[str]:
    """The private Redis, flushed after each test (it holds only data this session created)."""
    yield redis_server.url
    redis.Redis.from_url(redis_server.url).flushall()


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight models + offline tokenizers saved with save_pretrained; returns the registry file."""
    from pagedq.worker.demo.models import build_demo_models

    return build_demo_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of tiny models: a second intra-op thread only adds waiting (a lot, on a shared 2-core box).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
