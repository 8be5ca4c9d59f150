"""A worker process whose registry asks for bf16 K/V pages (`kv_cache_dtype = "bfloat16"`) for its translator and
its causal LM: real Redis, a real worker loading the demo models from disk, the Python client. The translations
equal the model's own `generate` with a cache that rounds its K/V to bf16 (`paged.kv_dtype.rounding_cache`, what
the engine is defined to compute: tests/worker/engine/paged/test_kv_cache_dtype.py), and the worker reports what
each model's pages store (`celery inspect stats`, Flower's model line). The same worker steps its classifier on one
intra-op thread (`intra_op_threads = 1` in its registry entry) and reports each model's count."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from executor_support import demo_registry_copy

from pagedq.producer.client import Client
from pagedq.shared.celery_config import make_celery
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Settings
from pagedq.worker.engine.paged.kv_dtype import rounding_cache
from pagedq.worker.registry import load_model
from scripts.stack import Stack

pytestmark = pytest.mark.integration

SOURCES = ["hello world", "the weather is nice today and we go out", "a b c d e f g"]
BF16_MODELS = ("demo-translator", "demo-llm")


@pytest.fixture(scope="module")
def kv_registry(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo registry, sources absolute, the translator and the causal LM with bf16 K/V pages."""

    def bf16_kv(text: str) -> str:
        for name in BF16_MODELS:
            header = f"[models.{name}]\n"
            assert header in text
            text = text.replace(header, header + 'kv_cache_dtype = "bfloat16"\n')
        text = text.replace("[models.demo-qa]\n", '[models.demo-qa]\nintra_op_threads = "auto"\n')
        return text.replace("[models.demo-classifier]\n", "[models.demo-classifier]\nintra_op_threads = 1\n")

    return demo_registry_copy(demo_models, tmp_path_factory.mktemp("kv"), bf16_kv)


@pytest.fixture(scope="module")
def stack(kv_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(registry_path=kv_registry, log_dir=tmp_path_factory.mktemp("logs"), worker_concurrency=4) as s:
        yield s


def test_a_bf16_kv_worker_translates_as_the_rounded_model_does(stack: Stack, kv_registry: Path) -> None:
    settings = Settings(redis_url=stack.redis_url or "", registry_path=kv_registry)
    with Client(settings=settings) as client:
        tasks = [client.translate(text, source_lang="en", target_lang="de", generation={"max_new_tokens": 12})
                 for text in SOURCES]  # fmt: skip
        results = [task.result(timeout=120) for task in tasks]

    registry = Registry.load(kv_registry)
    spec = registry.models[registry.defaults["translate"]]
    assert spec.kv_cache_dtype == "bfloat16"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        reference = load_model(spec, registry, "cpu")  # from disk, as the worker loaded it
    tok = reference.tokenizer
    for text, result in zip(SOURCES, results, strict=True):
        with torch.inference_mode():
            out = reference.model.generate(**tok(text, return_tensors="pt"), max_new_tokens=12, do_sample=False,
                                           cache=rounding_cache(reference.model, torch.bfloat16))  # fmt: skip
        assert result.translation == tok.decode(out[0], skip_special_tokens=True)


def test_the_worker_reports_what_each_models_pages_store(stack: Stack) -> None:
    app = make_celery(stack.settings())
    try:
        replies = app.control.inspect(timeout=5).stats() or {}
    finally:
        app.close()
    assert replies, "no worker answered `inspect stats`"
    (shown,) = replies.values()
    models = shown["pagedq"]["models"]
    for name in BF16_MODELS:
        assert models[name]["path"] == "paged", models[name]["path_reason"]
        assert models[name]["kv_cache_dtype"] == "bfloat16"
        assert "KV cache (bfloat16)" in shown[f"pagedq model {name}"]
    assert models["demo-classifier"]["kv_cache_dtype"] == ""  # no KV cache: an encoder
    assert models["demo-classifier"]["intra_op_threads"] == 1
    assert "intra-op threads 1" in shown["pagedq model demo-classifier"]
    # no setting: the worker's "auto" -- the model that never stepped (demo-llm) shows torch's count, the
    # translator the count of its latest step (measured: one of 1, 2, 4, .. up to torch's count)
    assert models["demo-llm"]["intra_op_threads"] == _fresh_torch_threads()
    assert 1 <= models["demo-translator"]["intra_op_threads"] <= _fresh_torch_threads()


def test_an_auto_model_reports_its_measured_threads(stack: Stack, kv_registry: Path) -> None:
    """`intra_op_threads = "auto"` (demo-qa here): the worker serves it and shows, per step size, the
    microseconds per token each thread count measured -- on one core there is nothing to choose."""
    settings = Settings(redis_url=stack.redis_url or "", registry_path=kv_registry)
    with Client(settings=settings) as client:
        for question in ("Who wrote it?", "When?", "Where was it written?", "What was written?") * 3:
            answer = client.qa(question=question, context=SOURCES[1], mode="extractive").result(timeout=120)
            assert answer.answer in SOURCES[1]
    app = make_celery(stack.settings())
    try:
        replies = app.control.inspect(timeout=5).stats() or {}
    finally:
        app.close()
    (shown,) = replies.values()
    qa = shown["pagedq"]["models"]["demo-qa"]
    if _fresh_torch_threads() == 1:
        assert qa["intra_op_threads"] == 1 and qa["intra_op_auto"] is None
        return
    assert qa["intra_op_threads"] in range(1, _fresh_torch_threads() + 1)
    table = qa["intra_op_auto"]
    assert table and all(int(bound) > 0 and counts for bound, counts in table.items())
    assert all(us > 0 for counts in table.values() for us in counts.values())
    assert f"intra-op threads {qa['intra_op_threads']} (auto)" in shown["pagedq model demo-qa"]


def _fresh_torch_threads() -> int:
    """torch's default intra-op threads in a new process with this environment: what a worker runs a model
    with when neither its registry entry nor PAGEDQ_INTRA_OP_THREADS sets any (this process may have changed
    its own count)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], check=True,
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip())
