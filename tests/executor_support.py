"""Shared helpers for the executor tests: load demo models, build requests, drive add()/step() loops."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from shared.models import TaskType
from shared.registry import Registry
from worker.engine.executor import EngineRequest, LoadedModel, ModelExecutor

SCORE_TOLERANCE = 1e-4
TEXTS = [
    "I love this product, it works great.",
    "Terrible.",
    "The delivery was late and the staff never answered my question about the refund, so I will not order again.",
    "Fine.",
    "Paris is the capital of France and the Eiffel tower is its most famous building.",
    "Quality is okay for the price",
    "What a wonderful experience, the hotel and the restaurant were perfect in every way!",
    "Slow",
]
AUTO_CLASSES = {
    "demo-classifier": AutoModelForSequenceClassification,
    "demo-multilabel": AutoModelForSequenceClassification,
    "demo-qa": AutoModelForQuestionAnswering,
    "demo-translator": AutoModelForSeq2SeqLM,
}
_ids = itertools.count()


def load_demo(registry_path: Path, name: str) -> LoadedModel:
    """A minimal stand-in for worker.registry.load_model: fp32 on the CPU, eval mode."""
    registry = Registry.load(registry_path)
    spec = registry.models[name]
    source = registry.resolve_source(spec)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        tokenizer = AutoTokenizer.from_pretrained(source)
    model = AUTO_CLASSES[name].from_pretrained(source, dtype=torch.float32).eval()
    return LoadedModel(spec, model, tokenizer, torch.device("cpu"), torch.float32)


def request(task: TaskType, payload: Any, model: str, **fields: Any) -> EngineRequest:
    return EngineRequest(id=f"r{next(_ids)}", task=task, payload=payload, model=model, **fields)


def run(executor: ModelExecutor, requests: list[EngineRequest], max_steps: int = 200) -> int:
    """Add the requests, step until idle; returns the number of steps."""
    for req in requests:
        executor.add(req)
    steps = 0
    while executor.has_work():
        executor.step()
        steps += 1
        assert steps <= max_steps, "executor made no progress"
    return steps


@contextmanager
def forward_shapes(model: Any) -> Iterator[list[tuple[int, ...]]]:
    """Records the input_ids shape of every forward of `model` while the block runs."""
    shapes: list[tuple[int, ...]] = []

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        shapes.append(tuple(ids.shape))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def long_text(words: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(TEXTS[2].split()), words))
