"""The extractive-QA executor against transformers' question-answering pipeline on the same model.

transformers 5 removed `pipeline("question-answering")`; `executor_support.reference_qa` is its v4
fast-tokenizer path ported line for line, scoring spans with transformers' own `select_starts_ends` (which v5
still ships). The demo QA model (BERT) packs; `test_extractive_qa_matches_the_pipeline` also runs padded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from executor_support import (
    SCORE_TOLERANCE,
    TEXTS,
    forward_batches,
    load_demo,
    long_text,
    reference_qa,
    request,
    run,
)
from transformers.pipelines.document_question_answering import select_starts_ends

from pagedq.shared.errors import DeadlineExceeded, InvalidRequest, TaskCancelled
from pagedq.shared.models import QARequest, QAResult, TaskType
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel
from pagedq.worker.engine.tasks import batching as _batching
from pagedq.worker.engine.tasks.extractive_qa import ExtractiveQAExecutor
from pagedq.worker.engine.tasks.qa_spans import WindowSpan, best_span, combine_windows


@pytest.fixture(scope="module")
def lm(demo_models: Path) -> LoadedModel:
    """The executors' model (a packing executor swaps its attention)."""
    return load_demo(demo_models, "demo-qa")


@pytest.fixture(scope="module")
def ref(demo_models: Path) -> LoadedModel:
    """A separate copy for the reference pipeline."""
    return load_demo(demo_models, "demo-qa")


QUESTIONS = [
    ("Where is the Eiffel tower?", TEXTS[4]),
    ("Who answered?", TEXTS[2]),
    ("What was wonderful?", TEXTS[6] + " " + TEXTS[0]),
    ("When was the tower built?", long_text(900)),  # several windows
    ("Which city is the capital?", " ".join(TEXTS * 25)),  # 3+ windows
    ("What is the price?", " ".join(TEXTS[:4] * 12)),
]


def ask(question: str, context: str, **fields: Any) -> EngineRequest:
    options = {k: fields.pop(k) for k in ("max_answer_len", "handle_impossible_answer") if k in fields}
    return request(TaskType.QA, QARequest(question=question, context=context, **options), "demo-qa", **fields)


@pytest.mark.parametrize(("impossible", "packing"), [(False, None), (True, None), (False, False)])
def test_extractive_qa_matches_the_pipeline(
    lm: LoadedModel, ref: LoadedModel, impossible: bool, packing: bool | None
) -> None:
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=2048, max_running_requests=8), packing)
    assert executor.forward.packed is (packing is None)
    reqs = [
        ask(q, c, max_answer_len=10 + 5 * i, handle_impossible_answer=impossible) for i, (q, c) in enumerate(QUESTIONS)
    ]
    with forward_batches(lm.model) as batches:
        steps = run(executor, reqs)
    stats = executor.stats().as_dict()
    windows = stats["num_windows"]
    assert windows >= len(QUESTIONS) + 5 and steps == len(batches) < windows  # batched across requests
    assert all(computed <= 2048 or inputs == 1 for inputs, computed in batches)
    assert stats["computed_tokens"] == sum(computed for _, computed in batches)
    assert (stats["padded_tokens"] == 0) is (packing is None)
    for i, (req, (question, context)) in enumerate(zip(reqs, QUESTIONS, strict=True)):
        got: QAResult = req.future.result(timeout=0)
        want = reference_qa(ref, question, context, 10 + 5 * i, impossible)
        assert (got.answer, got.start, got.end) == (want["answer"], want["start"], want["end"])
        assert got.score == pytest.approx(want["score"], abs=SCORE_TOLERANCE)
        assert got.answer == context[got.start : got.end] and got.mode == "extractive"
    print(f"extractive QA: {len(reqs)} requests, {windows} windows in {steps} forwards (inputs, tokens) {batches}")


def test_extractive_qa_long_context_spans_steps(lm: LoadedModel, ref: LoadedModel) -> None:
    question, context = QUESTIONS[4]
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=800, max_running_requests=8))
    long_req, short_req = ask(question, context), ask(*QUESTIONS[0], priority=1)
    steps = run(executor, [long_req, short_req])
    assert executor.stats().as_dict()["num_windows"] >= 4 and steps >= 3  # 384-token windows, two per step at most
    want = reference_qa(ref, question, context, 30, False)
    assert long_req.future.result(timeout=0).answer == want["answer"]
    assert long_req.future.result(timeout=0).input_tokens > 3 * 300
    assert short_req.future.result(timeout=0).answer


def test_extractive_qa_deadline_abort_and_long_question(lm: LoadedModel) -> None:
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=400))
    expired = ask(*QUESTIONS[0], deadline=time.time() - 1)
    aborted = ask(*QUESTIONS[4])
    too_long = ask(" ".join(["what"] * 300), TEXTS[4])
    kept = ask(*QUESTIONS[1])
    for req in (expired, aborted, too_long, kept):
        executor.add(req)
    assert executor.abort(expired.id, DeadlineExceeded("deadline passed"))  # what the engine loop does
    executor.step()  # the long context is now partly computed
    assert executor.abort(aborted.id, TaskCancelled("cancelled"))
    run(executor, [])
    with pytest.raises(DeadlineExceeded):
        expired.future.result(timeout=0)
    with pytest.raises(TaskCancelled):
        aborted.future.result(timeout=0)
    with pytest.raises(InvalidRequest, match=r"question is 300 tokens; the limit is"):
        too_long.future.result(timeout=0)
    assert kept.future.result(timeout=0).answer
    assert not executor.has_work() and executor.stats().as_dict()["num_requests_waiting"] == 0


def test_extractive_qa_tokenizes_a_bulk_a_window_per_step_most_urgent_first(lm: LoadedModel) -> None:
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_running_requests=16))
    calls: list[int] = []
    tokenizer = lm.tokenizer

    class Counting:  # the executor's tokenizer, counting the questions of each call (the first call per step)
        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("add_special_tokens") is False:
                calls.append(len(args[0]))
            return tokenizer(*args, **kwargs)

    executor.loaded = LoadedModel(lm.spec, lm.model, Counting(), lm.device, lm.dtype)
    bulk = [ask("Who wrote it?", f"Ada Lovelace wrote it in {1800 + i}.", priority=5) for i in range(600)]
    urgent = ask("Who wrote it?", "Ada Lovelace wrote it.", priority=0)
    for req in [*bulk, urgent]:
        executor.add(req)
    executor.step()
    assert urgent.future.done() and calls == [_batching.lookahead(16)]
    run(executor, [])
    assert all(n <= _batching.lookahead(16) for n in calls) and sum(calls) == len(bulk) + 1
    assert all(isinstance(r.future.result(timeout=0), QAResult) for r in bulk)


@pytest.mark.parametrize("seed", range(20))
def test_best_span_equals_select_starts_ends(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 60))
    start, end = rng.normal(0, 3, n).astype(np.float32), rng.normal(0, 3, n).astype(np.float32)
    p_mask = (rng.random(n) < 0.3).astype(np.int64)
    p_mask[0] = 0  # [CLS]
    max_len = int(rng.integers(1, 12))
    starts, ends, scores, null = select_starts_ends(
        start[None], end[None], p_mask[None], np.ones((1, n), dtype=np.int64), 1000000, 1, True, max_len
    )
    got = best_span(start, end, p_mask, max_len)
    assert got.null == pytest.approx(null, rel=1e-6)
    if len(starts):
        assert (got.start, got.end) == (starts[0], ends[0]) and got.score == pytest.approx(scores[0], rel=1e-6)
    else:
        assert got.start is None


def test_combine_windows_adds_equal_answers_and_lets_no_answer_win(lm: LoadedModel) -> None:
    context = "the tower is in paris and the tower is tall"
    enc = lm.tokenizer("where?", context).encodings[0]
    tower = enc.char_to_token(4, 1)  # "tower" in "the tower"
    spans = [WindowSpan(tower, tower, 0.1, 0.5), WindowSpan(tower, tower, 0.05, 0.4)]
    answer = combine_windows(spans, [enc, enc], context, 1, handle_impossible_answer=False)
    assert answer is not None and (answer.text, answer.start, answer.end) == ("tower", 4, 9)
    assert answer.score == pytest.approx(0.15)  # the same text in two windows: scores add
    no_answer = combine_windows(spans, [enc, enc], context, 1, handle_impossible_answer=True)  # min null 0.4
    assert no_answer is not None and (no_answer.text, no_answer.score) == ("", 0.4)
