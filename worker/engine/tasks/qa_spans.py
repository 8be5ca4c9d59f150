"""Extractive-QA span scoring, as transformers' question-answering pipeline does it (v4; removed in v5).

Per window (one row of start/end logits, unpadded)::

    logits of tokens that cannot answer (p_mask=1: question, specials)  ->  MASKED_LOGIT
    p_start = softmax(start), p_end = softmax(end)       # over the window's tokens
    null    = p_start[0] * p_end[0]                      # the "no answer" score ([CLS] at index 0)
    p_start[0] = p_end[0] = 0
    score(s, e) = p_start[s] * p_end[e]   for s <= e < s + max_answer_len; best one kept if s, e may answer

Across windows (`combine_windows`): each window's best span becomes character offsets in the context
(whole words: `token_to_word` -> `word_to_chars`, falling back to token offsets); spans with the same text
(case-insensitive) ADD their scores; the highest score wins; with `handle_impossible_answer` the empty
answer competes with the lowest null score of any window.

Arithmetic is float32 numpy in the pipeline's order of operations, so scores match it to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MASKED_LOGIT = -10000.0  # the pipeline's fill value (not -inf: every token keeps a finite exp)
NO_NULL_SCORE = 1_000_000.0  # "no window seen yet" for the running minimum of null scores


@dataclass(frozen=True)
class WindowSpan:
    """A window's best span: token indices (inclusive) and probability; `null` is its no-answer score."""

    start: int | None
    end: int | None
    score: float
    null: float


@dataclass(frozen=True)
class Answer:
    text: str
    score: float
    start: int  # character offsets into the context, end exclusive
    end: int


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, p_mask: np.ndarray, max_answer_len: int) -> WindowSpan:
    """The best span of one window. `p_mask` is 1 where a token cannot be part of an answer."""
    may_answer = np.abs(p_mask.astype(np.int64) - 1)
    masked = may_answer == 0
    start = _softmax(np.where(masked, MASKED_LOGIT, start_logits.astype(np.float32)))
    end = _softmax(np.where(masked, MASKED_LOGIT, end_logits.astype(np.float32)))
    null = float(start[0] * end[0])
    start[0] = end[0] = 0.0
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    s, e = np.unravel_index(int(np.argmax(candidates)), candidates.shape)
    if not (may_answer[s] and may_answer[e]):
        return WindowSpan(None, None, 0.0, null)
    return WindowSpan(int(s), int(e), float(candidates[s, e]), null)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def char_span(encoding: Any, start: int, end: int, context_index: int) -> tuple[int, int]:
    """Character offsets of tokens start..end, widened to whole words (the pipeline's align_to_words)."""
    try:
        start_word, end_word = encoding.token_to_word(start), encoding.token_to_word(end)
        return (
            encoding.word_to_chars(start_word, sequence_index=context_index)[0],
            encoding.word_to_chars(end_word, sequence_index=context_index)[1],
        )
    except Exception:  # tokenizers without words: keep to the token offsets (as the pipeline does)
        return encoding.offsets[start][0], encoding.offsets[end][1]


def combine_windows(
    spans: list[WindowSpan],
    encodings: list[Any],
    context: str,
    context_index: int,
    handle_impossible_answer: bool,
) -> Answer | None:
    """The answer over all windows of one request, in window order; None if no window has a span."""
    answers: list[Answer] = []
    for span, encoding in zip(spans, encodings, strict=True):
        if span.start is None or span.end is None:
            continue
        first, last = char_span(encoding, span.start, span.end, context_index)
        text = context[first:last]
        same = next((i for i, a in enumerate(answers) if a.text.lower() == text.lower()), None)
        if same is None:
            answers.append(Answer(text, span.score, first, last))
        else:
            answers[same] = Answer(
                answers[same].text, answers[same].score + span.score, answers[same].start, answers[same].end
            )
    if handle_impossible_answer:
        answers.append(Answer("", min([NO_NULL_SCORE, *(s.null for s in spans)]), 0, 0))
    if not answers:
        return None
    return sorted(answers, key=lambda a: a.score, reverse=True)[0]
