"""A worker process serving int8 models (registry `dtype = "int8"`) through the queue: real Redis, a real worker
loading the demo models from disk and quantizing them (native quantize/dequantize passes, each layer on the
fastest exact kernel for its shape), the Python client. Its results equal the int8 model's own transformers
forward and `generate` (the engines are exact on these models: tests/worker/engine/cpu/test_int8.py)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from executor_support import demo_registry_copy

from pagedq.producer.client import Client
from pagedq.shared.registry import ModelSpec, Registry
from pagedq.shared.settings import Settings
from pagedq.worker.engine.core.executor import LoadedModel
from pagedq.worker.registry import load_model
from scripts.stack import Stack

pytestmark = pytest.mark.integration

TEXTS = ["a good film", "slow service and cold food", "it was fine, nothing special at all", "yes"]
SOURCES = ["hello world", "the weather is nice today and we go out"]


@pytest.fixture(scope="module")
def int8_registry(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo registry with every model int8 (sources made absolute: the file lives elsewhere)."""

    def int8(text: str) -> str:
        text = text.replace('dtype = "float32"', 'dtype = "int8"')
        assert text.count('dtype = "int8"') >= 2
        return text

    return demo_registry_copy(demo_models, tmp_path_factory.mktemp("int8"), int8)


@pytest.fixture(scope="module")
def stack(int8_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(registry_path=int8_registry, log_dir=tmp_path_factory.mktemp("logs"), worker_concurrency=4) as s:
        yield s


def _reference(registry_path: Path, kind: str) -> LoadedModel:
    registry = Registry.load(registry_path)
    spec = registry.models[registry.defaults[kind]]
    assert spec.dtype == "int8"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        return load_model(ModelSpec.model_validate(spec.model_dump()), registry, "cpu")


def test_an_int8_worker_classifies_and_translates_as_its_int8_model_does(stack: Stack, int8_registry: Path) -> None:
    settings = Settings(redis_url=stack.redis_url or "", registry_path=int8_registry)
    with Client(settings=settings) as client:
        classified = [client.classify(text, top_k=None) for text in TEXTS]
        translated = [client.translate(text, source_lang="en", target_lang="de", generation={"max_new_tokens": 12})
                      for text in SOURCES]  # fmt: skip
        classify_results = [task.result(timeout=120) for task in classified]
        translate_results = [task.result(timeout=120) for task in translated]

    classifier = _reference(int8_registry, "classify")
    id2label = classifier.model.config.id2label
    for text, result in zip(TEXTS, classify_results, strict=True):
        with torch.inference_mode():
            probs = classifier.model(**classifier.tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
        want = {id2label[i]: float(p) for i, p in enumerate(probs)}
        got = {s.label: s.score for s in result.scores}
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < 1e-4 for k in want), (text, got, want)

    translator = _reference(int8_registry, "translate")
    tok = translator.tokenizer
    for text, result in zip(SOURCES, translate_results, strict=True):
        with torch.inference_mode():
            out = translator.model.generate(**tok(text, return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert result.translation == tok.decode(out[0], skip_special_tokens=True)
