"""W5 baseline: what a user writes first. A plain Celery worker whose tasks run transformers one request at a time.

    PAGEDQ_REDIS_URL=redis://... PAGEDQ_REGISTRY_PATH=.../registry.toml \
        celery -A bench.w5_naive_worker worker -P threads -c 64

Models are the registry's defaults (the demo models, or bench/w5_models.py's realistic ones), loaded once when
the worker starts on the device pagedq's worker would use (PAGEDQ_DEVICE; `auto`: the first GPU if there is one,
as a user passes `device=0`), in their saved dtype, and shared by every task thread, with no lock and no batching:
  classify   `pipeline("text-classification")` on the text (its top label, like pagedq's default top_k=1)
  translate  tokenizer + `model.generate` with the model's generation config and the request's
             `generation.max_new_tokens` if it sets one (transformers 5 has no translation pipeline),
             decoded without special tokens
  qa         transformers v4's question-answering pipeline (removed in v5), as tests/executor_support.py
             ports it: overlapping windows, one forward each, spans from `select_starts_ends`
Celery settings are pagedq's, with results stored (`w5_noop_worker.make_app`); clients wait with `get()`.
Every result also carries `in_task_s`: the seconds the task spent in tokenizer and model (where its time went).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch
from celery.signals import worker_init
from transformers import AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline
from transformers.pipelines.document_question_answering import select_starts_ends
from transformers.utils import logging as hf_logging
from w5_noop_worker import make_app

from pagedq.shared.models import TaskType
from pagedq.shared.registry import Registry
from pagedq.shared.settings import get_settings
from pagedq.worker.registry import resolve_device

TASKS = {kind: f"w5.naive.{kind}" for kind in ("classify", "translate", "qa")}
MAX_ANSWER_LEN = 30  # pagedq's QARequest default
QA_MAX_SEQ_LEN, QA_STRIDE = 384, 128  # the v4 pipeline's defaults

app = make_app(main="w5-naive")
models: dict[str, Any] = {}
device = torch.device("cpu")  # set when the worker starts (load_models)


@worker_init.connect
def load_models(**_: Any) -> None:
    """Load the registry's default model of each task type (only in the worker, before it consumes)."""
    global device
    settings = get_settings()
    device = resolve_device(settings.device)
    registry_path = settings.registry_path
    assert registry_path is not None, "PAGEDQ_REGISTRY_PATH names the demo registry"
    registry = Registry.load(Path(registry_path))
    source = {t: registry.resolve_source(registry.models[registry.defaults[t]]) for t in TaskType}
    warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
    hf_logging.set_verbosity_error()  # generate warns on every call that max_new_tokens overrides max_length
    models["classify"] = pipeline("text-classification", model=source[TaskType.CLASSIFY], device=device)
    models["translate"] = (
        AutoTokenizer.from_pretrained(source[TaskType.TRANSLATE]),
        AutoModelForSeq2SeqLM.from_pretrained(source[TaskType.TRANSLATE]).eval().to(device),
    )
    models["qa"] = (
        AutoTokenizer.from_pretrained(source[TaskType.QA]),
        AutoModelForQuestionAnswering.from_pretrained(source[TaskType.QA]).eval().to(device),
    )


@app.task(name=TASKS["classify"])
def classify(text: str) -> dict[str, Any]:
    start = time.perf_counter()
    return {**models["classify"](text)[0], "in_task_s": time.perf_counter() - start}


@app.task(name=TASKS["translate"])
def translate(
    text: str, source_lang: str | None = None, target_lang: str | None = None, generation: dict | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    tokenizer, model = models["translate"]
    max_new_tokens = (generation or {}).get("max_new_tokens")  # None: the generation config's length
    with torch.inference_mode():
        output = model.generate(**tokenizer(text, return_tensors="pt").to(device), max_new_tokens=max_new_tokens)
    generated = output[0, 1:]  # after the decoder start token; one sequence, so no padding
    return {
        "translation": tokenizer.decode(generated, skip_special_tokens=True),
        "output_tokens": len(generated),
        "in_task_s": time.perf_counter() - start,
    }


@app.task(name=TASKS["qa"])
def qa(question: str, context: str) -> dict[str, Any]:
    start = time.perf_counter()
    tokenizer, model = models["qa"]
    return {**extractive_answer(tokenizer, model, question, context), "in_task_s": time.perf_counter() - start}


def extractive_answer(tokenizer: Any, model: Any, question: str, context: str) -> dict[str, Any]:
    """The best span over every window of the context (v4 pipeline semantics, no impossible answer)."""
    encoded = tokenizer(
        text=question,
        text_pair=context,
        truncation="only_second",
        max_length=min(tokenizer.model_max_length, QA_MAX_SEQ_LEN),
        stride=QA_STRIDE,
        return_token_type_ids=True,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    best: dict[str, Any] = {"score": -1.0, "start": 0, "end": 0, "answer": ""}
    for window in range(len(encoded["input_ids"])):
        p_mask = [token != 1 for token in encoded.sequence_ids(window)]
        p_mask[encoded["input_ids"][window].index(tokenizer.cls_token_id)] = False
        inputs = {k: torch.tensor([encoded[k][window]], device=model.device) for k in tokenizer.model_input_names}
        with torch.inference_mode():
            out = model(**inputs)
        starts, ends, scores, _ = select_starts_ends(
            out.start_logits.cpu(),
            out.end_logits.cpu(),
            torch.tensor([p_mask]),
            inputs["attention_mask"].cpu().numpy(),
            1000000,
            1,
            False,
            MAX_ANSWER_LEN,
        )
        offsets = encoded["offset_mapping"][window]
        for s, e, score in zip(starts, ends, scores, strict=True):
            if score.item() > best["score"]:
                start, end = offsets[s][0], offsets[e][1]
                best = {"score": score.item(), "start": start, "end": end, "answer": context[start:end]}
    return best
