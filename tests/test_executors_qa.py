"""The extractive-QA executor against transformers' question-answering pipeline on the same model.

transformers 5 removed `pipeline("question-answering")`; `reference_qa` below is its v4 fast-tokenizer path
ported line for line, scoring spans with transformers' own `select_starts_ends` (which v5 still ships).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from executor_support import SCORE_TOLERANCE, TEXTS, forward_shapes, load_demo, long_text, request, run
from transformers.pipelines.document_question_answering import select_starts_ends

from shared.errors import DeadlineExceeded, InvalidRequest, TaskCancelled
from shared.models import QARequest, QAResult, TaskType
from worker.engine._qa_spans import WindowSpan, best_span, combine_windows
from worker.engine.executor import EngineConfig, EngineRequest, LoadedModel
from worker.engine.extractive_qa import ExtractiveQAExecutor


@pytest.fixture(scope="module")
def lm(demo_models: Path) -> LoadedModel:
    return load_demo(demo_models, "demo-qa")


def reference_qa(lm: LoadedModel, question: str, context: str, max_answer_len: int, impossible: bool) -> dict:
    """transformers' v4 question-answering pipeline (removed in v5), one unpadded forward per window.

    Windowing and postprocessing are ported line for line; span scoring is transformers' own
    `select_starts_ends` (still shipped in v5 with the document-QA pipeline).
    """
    tokenizer, model = lm.tokenizer, lm.model
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


@pytest.mark.parametrize("impossible", [False, True])
def test_extractive_qa_matches_the_pipeline(lm: LoadedModel, impossible: bool) -> None:
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=2048, max_running_requests=8))
    reqs = [
        ask(q, c, max_answer_len=10 + 5 * i, handle_impossible_answer=impossible) for i, (q, c) in enumerate(QUESTIONS)
    ]
    with forward_shapes(lm.model) as shapes:
        steps = run(executor, reqs)
    windows = executor.stats()["num_windows"]
    assert windows >= len(QUESTIONS) + 5 and steps == len(shapes) < windows  # batched across requests
    for i, (req, (question, context)) in enumerate(zip(reqs, QUESTIONS, strict=True)):
        got: QAResult = req.future.result(timeout=0)
        want = reference_qa(lm, question, context, 10 + 5 * i, impossible)
        assert (got.answer, got.start, got.end) == (want["answer"], want["start"], want["end"])
        assert got.score == pytest.approx(want["score"], abs=SCORE_TOLERANCE)
        assert got.answer == context[got.start : got.end] and got.mode == "extractive"
    print(f"extractive QA: {len(reqs)} requests, {windows} windows in {steps} forwards {shapes}")


def test_extractive_qa_long_context_spans_steps(lm: LoadedModel) -> None:
    question, context = QUESTIONS[4]
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=800, max_running_requests=8))
    long_req, short_req = ask(question, context), ask(*QUESTIONS[0], priority=1)
    steps = run(executor, [long_req, short_req])
    assert executor.stats()["num_windows"] >= 4 and steps >= 3  # 384-token windows, two per step at most
    want = reference_qa(lm, question, context, 30, False)
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
    assert not executor.has_work() and executor.stats()["num_requests_waiting"] == 0


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
