"""The classification executor, driven through add()/step(), against transformers' pipeline on the same models.

The demo models (BERT, DistilBERT) pack; tests marked `packing` run both the packed and the padded path.
(Extractive QA: test_executors_qa.py; translation: test_executors_translate.py; RoBERTa, XLM-RoBERTa,
DeBERTa-v2 and the packing internals: tests/worker/engine/encoder/test_encoder_packing.py.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from executor_support import (
    SCORE_TOLERANCE,
    TEXTS,
    forward_batches,
    forward_shapes,
    load_demo,
    long_text,
    pipeline_scores,
    request,
    run,
)

from pagedq.shared.errors import DeadlineExceeded, InvalidRequest, TaskCancelled
from pagedq.shared.models import ClassifyRequest, ClassifyResult, TaskType
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel
from pagedq.worker.engine.tasks import batching as _batching
from pagedq.worker.engine.tasks.batching import WaitingQueue, drop_finished, order_key, pick_batch, pick_packed
from pagedq.worker.engine.tasks.classify import ClassificationExecutor

NAMES = ("demo-classifier", "demo-multilabel")
packing = pytest.mark.parametrize("packing", [None, False], ids=["packed", "padded"])


@pytest.fixture(scope="module")
def loaded(demo_models: Path) -> dict[str, LoadedModel]:
    """The executors' models (packing executors swap their attention)."""
    return {name: load_demo(demo_models, name) for name in NAMES}


@pytest.fixture(scope="module")
def reference(demo_models: Path) -> dict[str, LoadedModel]:
    """Separate copies for transformers' pipeline, never touched by an executor."""
    return {name: load_demo(demo_models, name) for name in NAMES}


def classify(text: str, model: str = "demo-classifier", **fields: Any) -> EngineRequest:
    options = {k: fields.pop(k) for k in ("top_k", "function_to_apply", "truncate") if k in fields}
    return request(TaskType.CLASSIFY, ClassifyRequest(text=text, **options), model, **fields)


@packing
@pytest.mark.parametrize("name", NAMES)
def test_classify_scores_match_pipeline(
    loaded: dict[str, LoadedModel], reference: dict[str, LoadedModel], name: str, packing: bool | None
) -> None:
    lm = loaded[name]
    executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=512, max_running_requests=16), packing)
    assert executor.forward.packed is (packing is None)
    reqs = [classify(t, name, top_k=None) for t in TEXTS]
    with forward_shapes(lm.model) as shapes:
        run(executor, reqs)
    assert len(shapes) < len(reqs)  # micro-batched, not one forward per request
    labels = set()
    for req, text in zip(reqs, TEXTS, strict=True):
        result: ClassifyResult = req.future.result(timeout=0)
        expected = pipeline_scores(reference[name], text)
        assert [s.label for s in result.scores] == [e["label"] for e in expected]
        assert [s.score for s in result.scores] == pytest.approx([e["score"] for e in expected], abs=SCORE_TOLERANCE)
        assert (result.label, result.score, result.model) == (expected[0]["label"], result.scores[0].score, name)
        assert result.input_tokens == len(lm.tokenizer(text)["input_ids"]) and not result.truncated
        labels.add(result.label)
    assert len(labels) > 1  # the demo models' scores depend on the text
    if name == "demo-multilabel":  # sigmoid scores: independent, not a distribution
        assert sum(s.score for s in reqs[0].future.result().scores) > 1.1


def test_classify_top_k_and_function_override(
    loaded: dict[str, LoadedModel], reference: dict[str, LoadedModel]
) -> None:
    lm = loaded["demo-classifier"]
    executor = ClassificationExecutor(lm, EngineConfig())
    one, two = classify(TEXTS[0]), classify(TEXTS[0], top_k=2)
    raw, sigmoid = classify(TEXTS[0], function_to_apply="none"), classify(TEXTS[0], function_to_apply="sigmoid")
    run(executor, [one, two, raw, sigmoid])
    assert len(one.future.result().scores) == 1 and len(two.future.result().scores) == 2
    first, second = one.future.result().scores[0], two.future.result().scores[0]
    # the same text twice in one forward: equal up to float rounding (a GEMM may round rows by position)
    assert first.label == second.label and first.score == pytest.approx(second.score, abs=1e-6)
    for req, function in ((raw, "none"), (sigmoid, "sigmoid")):
        expected = pipeline_scores(reference["demo-classifier"], TEXTS[0], function_to_apply=function)
        assert req.future.result().score == pytest.approx(expected[0]["score"], abs=SCORE_TOLERANCE)


@packing
def test_classify_batches_under_the_token_budget(loaded: dict[str, LoadedModel], packing: bool | None) -> None:
    lm = loaded["demo-classifier"]
    budget, cap = 96, 3
    executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=budget, max_running_requests=cap), packing)
    texts = TEXTS * 3
    reqs = [classify(t) for t in texts]
    with forward_batches(lm.model) as batches:
        steps = run(executor, reqs)
    assert all(r.future.result(timeout=0).label for r in reqs)
    assert steps == len(batches) < len(reqs)
    for inputs, computed in batches:  # computed: packed, the real tokens; padded, rows * longest
        assert inputs <= cap and (computed <= budget or inputs == 1)
    real = sum(len(lm.tokenizer(t)["input_ids"]) for t in texts)
    stats = executor.stats().as_dict()
    assert stats["computed_tokens"] == sum(computed for _, computed in batches)
    assert stats["padded_tokens"] == stats["computed_tokens"] - real
    assert stats["padded_tokens"] == 0 or packing is False
    print(f"classify: {len(reqs)} requests in {len(batches)} forwards (inputs, computed tokens): {batches}")


def test_classify_packs_in_queue_order_first_fit(loaded: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-classifier"]
    texts = [TEXTS[2], TEXTS[6], TEXTS[4], TEXTS[1], TEXTS[3], TEXTS[7]]
    assert [len(lm.tokenizer(t)["input_ids"]) for t in texts] == [26, 22, 30, 4, 4, 3]
    executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=56, max_running_requests=4))
    with forward_shapes(lm.model) as shapes:
        run(executor, [classify(t) for t in texts])
    # step 1: 26 + 22 = 48; 30 does not fit, 4 and 4 do (56, the cap of 4); step 2: the rest
    assert shapes == [(1, 26 + 22 + 4 + 4), (1, 30 + 3)]
    assert executor.stats().as_dict()["padded_tokens"] == 0


def test_classify_length_bucketing_limits_padding(loaded: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-classifier"]
    short, longer = ["Fine.", "Slow", "Terrible."], [TEXTS[2], TEXTS[6], TEXTS[4]]
    config = EngineConfig(max_batch_tokens=4096, max_running_requests=3)
    executor = ClassificationExecutor(lm, config, packing=False)
    with forward_shapes(lm.model) as shapes:
        run(executor, [classify(t) for pair in zip(short, longer, strict=True) for t in pair])
    assert sorted(rows for rows, _ in shapes) == [3, 3]  # short ones together, long ones together
    assert min(cols for _, cols in shapes) <= 6


def test_classify_priority_then_arrival(loaded: dict[str, LoadedModel]) -> None:
    executor = ClassificationExecutor(loaded["demo-classifier"], EngineConfig(max_running_requests=1))
    order: list[str] = []
    reqs = [classify(TEXTS[i], priority=p) for i, p in enumerate([5, 0, 5, -3, 0])]
    for req in reqs:
        req.future.add_done_callback(lambda _f, rid=req.id: order.append(rid))
    run(executor, reqs)
    assert order == [reqs[i].id for i in (3, 1, 4, 0, 2)]


def test_classify_deadline_and_abort(loaded: dict[str, LoadedModel]) -> None:
    """A cancel and a deadline reach the executor as `abort` (the engine loop owns deadlines: it aborts an expired
    request through its executor, tests/worker/engine/test_engine_loop.py and test_deadlines_through_the_loop.py):
    neither request is computed."""
    lm = loaded["demo-classifier"]
    executor = ClassificationExecutor(lm, EngineConfig())
    expired, aborted, kept = classify(TEXTS[0], deadline=time.time() - 1), classify(TEXTS[1]), classify(TEXTS[2])
    for req in (expired, aborted, kept):
        executor.add(req)
    assert executor.abort(expired.id, DeadlineExceeded("deadline passed"))
    assert executor.abort(aborted.id, TaskCancelled("cancelled by the user"))
    assert not executor.abort("no-such-request", TaskCancelled("x"))
    with forward_shapes(lm.model) as shapes:
        run(executor, [])
    with pytest.raises(DeadlineExceeded):
        expired.future.result(timeout=0)
    with pytest.raises(TaskCancelled):
        aborted.future.result(timeout=0)
    assert kept.future.result(timeout=0).label
    assert shapes == [(1, len(lm.tokenizer(TEXTS[2])["input_ids"]))]  # neither dropped request was computed
    assert executor.stats().as_dict()["num_requests_waiting"] == 0 and not executor.has_work()


def test_classify_truncation(loaded: dict[str, LoadedModel], reference: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-classifier"]
    text = long_text(700)
    executor = ClassificationExecutor(lm, EngineConfig())
    cut, rejected, short = classify(text, top_k=None), classify(text, truncate=False), classify(TEXTS[1])
    run(executor, [cut, rejected, short])
    result = cut.future.result(timeout=0)
    assert result.truncated and result.input_tokens == 512
    expected = pipeline_scores(reference["demo-classifier"], text, truncation=True)
    assert [s.score for s in result.scores] == pytest.approx([e["score"] for e in expected], abs=SCORE_TOLERANCE)
    with pytest.raises(InvalidRequest, match=r"text is \d+ tokens; the model's limit is 512"):
        rejected.future.result(timeout=0)
    assert not short.future.result(timeout=0).truncated


def test_a_bulk_is_tokenized_a_window_per_step_most_urgent_first(loaded: dict[str, LoadedModel]) -> None:
    """Thousands added at once are not tokenized in one call that holds the engine thread: each step tokenizes
    at most its lookahead window, most urgent first -- so an urgent request added behind a bulk runs in the
    first step."""
    executor = ClassificationExecutor(loaded["demo-classifier"], EngineConfig(max_running_requests=16))
    assert executor._encoder is not None  # the demo tokenizer takes the thread-safe path
    calls: list[int] = []
    encode = executor._encoder.encode
    executor._encoder.encode = lambda texts: calls.append(len(texts)) or encode(texts)  # type: ignore[method-assign]
    bulk = [classify(TEXTS[i % len(TEXTS)], priority=5) for i in range(1000)]
    urgent = classify(TEXTS[0], priority=0)
    for req in [*bulk, urgent]:
        executor.add(req)
    executor.step()
    assert urgent.future.done() and calls == [_batching.lookahead(16)]
    steps = run(executor, [])
    assert all(n <= _batching.lookahead(16) for n in calls) and sum(calls) == len(bulk) + 1 and steps > 1
    assert all(r.future.result(timeout=0).label for r in bulk)


@packing
def test_prepared_requests_give_what_the_engine_thread_computes(loaded: dict[str, LoadedModel],
                                                                packing: bool | None) -> None:
    """`prepare` (a task thread tokenizing before the hand-off) changes nothing in the results; texts over the
    model's limit stay unprepared and are truncated or rejected by the step as before."""
    lm = loaded["demo-classifier"]
    executor = ClassificationExecutor(lm, EngineConfig(max_running_requests=8), packing)
    texts = [*TEXTS, long_text(700)]
    plain = [classify(t, top_k=None) for t in texts]
    prepared = [classify(t, top_k=None) for t in texts]
    executor.prepare(prepared)
    assert [r.prepared is not None for r in prepared] == [True] * len(TEXTS) + [False]
    run(executor, plain)
    run(executor, prepared)
    for a, b in zip(plain, prepared, strict=True):
        ra, rb = a.future.result(timeout=0), b.future.result(timeout=0)
        assert (ra.label, ra.input_tokens, ra.truncated) == (rb.label, rb.input_tokens, rb.truncated)
        assert [s.score for s in ra.scores] == pytest.approx([s.score for s in rb.scores], abs=1e-6)
    assert prepared[-1].future.result(timeout=0).truncated


def test_a_step_of_prepared_requests_tells_its_size_before_it_runs(loaded: dict[str, LoadedModel]) -> None:
    """`planned_tokens`: what the next step computes, known before it (the engine picks its threads by it)."""
    executor = ClassificationExecutor(loaded["demo-classifier"], EngineConfig(max_running_requests=4))
    assert executor.planned_tokens() is None  # nothing waits
    unprepared = [classify(t) for t in TEXTS[:2]]
    for waiting in unprepared:
        executor.add(waiting)
    assert executor.planned_tokens() is None  # its texts are tokenized in the step: not known yet
    run(executor, [])
    prepared = [classify(t) for t in TEXTS * 2]
    executor.prepare(prepared)
    for waiting in prepared:
        executor.add(waiting)
    planned = executor.planned_tokens()
    before = executor.work_done()
    executor.step()
    assert planned == executor.work_done() - before == sum(r.prepared.num_tokens for r in prepared[:4])


def test_a_deep_queue_costs_a_step_its_window_and_still_expires_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """With thousands waiting, a step looks at the head window only; requests deep in the queue that were
    completed elsewhere (cancelled, or failed by the engine loop's deadline) are still dropped by the periodic
    full check; removing a batch keeps the order."""
    queue: WaitingQueue[str] = WaitingQueue()
    reqs = [classify(TEXTS[i % len(TEXTS)], priority=i % 3) for i in range(3000)]
    for i, req in enumerate(reqs):
        queue.push(req, f"item{i}", order_key(req))
    assert [r.priority for r, _ in queue.head(5)] == [0] * 5 and len(queue.head(300)) == 300
    now = time.time()
    deep = next(r for r, _ in reversed(list(queue)))  # the last in line
    deep.fail(DeadlineExceeded("deadline passed"))  # as the engine loop fails an expired request
    cancelled = next(r for r, _ in list(queue)[2000:])
    cancelled.fail(TaskCancelled("cancelled"))
    queue.scanned_at = now  # a full check just ran: this step looks at its window only
    assert drop_finished(queue, now, head=_batching.lookahead(64)) == []
    assert len(queue) == 3000
    dropped = drop_finished(queue, now + 2 * _batching.FULL_SCAN_S, head=_batching.lookahead(64))
    assert {r.id for r in dropped} == {deep.id, cancelled.id} and len(queue) == 2998
    with pytest.raises(DeadlineExceeded):
        deep.future.result(timeout=0)
    order = [item for _, item in queue]
    batch = [order[0], order[3], order[7]]
    queue.remove_items(batch)
    assert [item for _, item in queue] == [x for x in order if x not in batch]
    queue.remove_items(["not queued"])  # nothing to remove: unchanged
    assert len(queue) == 2995


def test_pick_batch_follows_priority_then_length() -> None:
    """The example of worker/engine/tasks/batching.py's docstring, plus a higher-priority long item."""
    lengths = {"A": 120, "B": 30, "C": 500, "D": 28, "E": 33}
    reqs = {name: classify(TEXTS[0]) for name in lengths}
    candidates = [(reqs[name], name) for name in lengths]
    picked = pick_batch(candidates, length=lengths.__getitem__, max_tokens=512, max_items=8)
    assert [name for _, name in picked] == ["A", "E", "B", "D"]
    assert [name for _, name in pick_batch(candidates, lengths.__getitem__, 512, 2)] == ["A", "E"]
    urgent = classify(TEXTS[0], priority=-1)
    lengths["U"] = 200
    first = [(urgent, "U"), *candidates]
    assert [name for _, name in pick_batch(first, lengths.__getitem__, 512, 8)] == ["U", "A"]


def test_pick_packed_is_first_fit_in_queue_order() -> None:
    """The packed example of worker/engine/tasks/batching.py's docstring; the head runs even over the budget."""
    lengths = {"A": 120, "B": 300, "C": 500, "D": 28}
    candidates = [(classify(TEXTS[0]), name) for name in lengths]
    assert [name for _, name in pick_packed(candidates, lengths.__getitem__, 512, 8)] == ["A", "B", "D"]
    assert [name for _, name in pick_packed(candidates, lengths.__getitem__, 512, 2)] == ["A", "B"]
    assert [name for _, name in pick_packed(candidates[2:], lengths.__getitem__, 100, 8)] == ["C"]
