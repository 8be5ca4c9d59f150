"""Shared helpers for the executor tests: load models, build requests, drive add()/step() loops, references.

References run on a SEPARATE copy of the model (`load_demo` loads a fresh one each call): a packing executor
swaps its own model's attention implementation, so the reference must not share that model or its config.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)
from transformers.pipelines.document_question_answering import select_starts_ends

from pagedq.shared.models import TaskType
from pagedq.shared.registry import Registry
from pagedq.worker.engine.core.executor import EngineRequest, LoadedModel, ModelExecutor
from pagedq.worker.engine.encoder.varlen_attention import SEGMENTS_KWARG, VARLEN_ATTENTION

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


@contextmanager
def forward_batches(model: Any) -> Iterator[list[tuple[int, int]]]:
    """Records (inputs, computed tokens) of every forward of `model` while the block runs.

    Packed forwards (input_ids [1, T] with segments): (number of segments, T). Padded: (rows, rows * columns)."""
    batches: list[tuple[int, int]] = []

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        segments = kwargs.get(SEGMENTS_KWARG)
        batches.append((len(segments.lengths), ids.shape[1]) if segments is not None else (ids.shape[0], ids.numel()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield batches
    finally:
        handle.remove()


def pipeline_scores(lm: LoadedModel, text: str, **kwargs: Any) -> list[dict[str, Any]]:
    """`pipeline("text-classification", top_k=None)` on `lm` (a reference copy): every label, best first."""
    assert lm.model.config._attn_implementation != VARLEN_ATTENTION, "references run transformers' own attention"
    classifier = pipeline("text-classification", model=lm.model, tokenizer=lm.tokenizer, top_k=None)
    return classifier([text], **kwargs)[0]


def reference_qa(lm: LoadedModel, question: str, context: str, max_answer_len: int, impossible: bool) -> dict:
    """transformers' v4 question-answering pipeline (removed in v5), one unpadded forward per window.

    Windowing and postprocessing are ported line for line; span scoring is transformers' own
    `select_starts_ends` (still shipped in v5 with the document-QA pipeline). `lm` is a reference copy.
    """
    tokenizer, model = lm.tokenizer, lm.model
    assert model.config._attn_implementation != VARLEN_ATTENTION, "references run transformers' own attention"
    max_seq_len = min(tokenizer.model_max_length, 384)
    encoded = tokenizer(
        text=question,
        text_pair=context,
        truncation="only_second",
        max_length=max_seq_len,
        stride=min(max_seq_len // 2, 128),
        return_token_type_ids=True,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    min_null_score, answers = 1000000, []
    for span in range(len(encoded["input_ids"])):
        p_mask = [tok != 1 for tok in encoded.sequence_ids(span)]
        ids = encoded["input_ids"][span]
        for i in range(len(ids)):
            if ids[i] == tokenizer.cls_token_id:
                p_mask[i] = 0
        inputs = {k: torch.tensor([encoded[k][span]]) for k in tokenizer.model_input_names}
        with torch.no_grad():
            out = model(**inputs)
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits,
            out.end_logits,
            torch.tensor([p_mask]),
            inputs["attention_mask"].numpy(),
            min_null_score,
            1,
            impossible,
            max_answer_len,
        )
        enc = encoded[span]
        for s, e, score in zip(starts, ends, scores, strict=True):
            try:
                start = enc.word_to_chars(enc.token_to_word(s), sequence_index=1)[0]
                end = enc.word_to_chars(enc.token_to_word(e), sequence_index=1)[1]
            except Exception:
                start, end = enc.offsets[s][0], enc.offsets[e][1]
            same = [a for a in answers if a["answer"].lower() == context[start:end].lower()]
            if same:
                same[0]["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": start, "end": end, "answer": context[start:end]})
    if impossible:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda x: x["score"], reverse=True)[0]


def long_text(words: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(TEXTS[2].split()), words))


def demo_registry_copy(demo_models: Path, directory: Path, edit: Callable[[str], str] = lambda text: text) -> Path:
    """The demo registry (`demo_models`) written to `directory`/registry.toml after `edit`, its model sources made
    absolute so that the copy loads the same models from its other folder."""
    text = demo_models.read_text().replace('source = "./', f'source = "{demo_models.parent}/')
    path = directory / "registry.toml"
    path.write_text(edit(text))
    return path
