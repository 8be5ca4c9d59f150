"""The encoder executors, driven directly through add()/step(), against transformers on the same models.

Every comparison runs the same random-weight demo model both ways: the executor (batched, padded, bucketed)
and transformers' own pipeline or a per-request `generate`.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

from shared.errors import DeadlineExceeded, InvalidRequest, TaskCancelled, UnsupportedLanguagePair
from shared.models import (
    ClassifyRequest,
    ClassifyResult,
    GenerationOptions,
    QARequest,
    QAResult,
    TaskType,
    TranslateRequest,
    TranslateResult,
)
from shared.registry import Registry
from worker.engine.classify import ClassificationExecutor
from worker.engine.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor
from worker.engine.extractive_qa import ExtractiveQAExecutor
from worker.engine.translate import Seq2SeqExecutor

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
_ids = itertools.count()

AUTO = {
    "demo-classifier": AutoModelForSequenceClassification,
    "demo-multilabel": AutoModelForSequenceClassification,
    "demo-qa": AutoModelForQuestionAnswering,
    "demo-translator": AutoModelForSeq2SeqLM,
}


# ---- helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(demo_models: Path) -> dict[str, LoadedModel]:
    """A minimal stand-in for worker.registry.load_model: fp32 on the CPU, eval mode."""
    registry = Registry.load(demo_models)
    models = {}
    for name, auto in AUTO.items():
        spec = registry.models[name]
        source = registry.resolve_source(spec)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
            tokenizer = AutoTokenizer.from_pretrained(source)
        model = auto.from_pretrained(source, dtype=torch.float32).eval()
        models[name] = LoadedModel(spec, model, tokenizer, torch.device("cpu"), torch.float32)
    return models


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


@pytest.fixture()
def count_forwards() -> Iterator[Any]:
    """`count_forwards(model)` -> a list that receives each forward's input_ids shape."""
    handles = []

    def attach(model: Any) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def hook(_module: Any, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            shapes.append(tuple(ids.shape))

        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        return shapes

    yield attach
    for handle in handles:
        handle.remove()


def classify(text: str, model: str = "demo-classifier", **fields: Any) -> EngineRequest:
    options = {k: fields.pop(k) for k in ("top_k", "function_to_apply", "truncate") if k in fields}
    return request(TaskType.CLASSIFY, ClassifyRequest(text=text, **options), model, **fields)


def long_text(words: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(TEXTS[2].split()), words))


# ---- classification ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo-classifier", "demo-multilabel"])
def test_classify_scores_match_pipeline(loaded: dict[str, LoadedModel], name: str, count_forwards: Any) -> None:
    lm = loaded[name]
    shapes = count_forwards(lm.model)
    executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=512, max_running_requests=16))
    reqs = [classify(t, name, top_k=None) for t in TEXTS]
    run(executor, reqs)
    assert len(shapes) < len(reqs)  # micro-batched, not one forward per request
    reference = pipeline("text-classification", model=lm.model, tokenizer=lm.tokenizer, top_k=None)
    for req, text in zip(reqs, TEXTS, strict=True):
        result: ClassifyResult = req.future.result(timeout=0)
        expected = reference(text)[0] if isinstance(reference(text)[0], list) else reference(text)
        assert [s.label for s in result.scores] == [e["label"] for e in expected]
        for got, want in zip(result.scores, expected, strict=True):
            assert got.score == pytest.approx(want["score"], abs=SCORE_TOLERANCE)
        assert (result.label, result.model) == (expected[0]["label"], name)
        assert result.input_tokens == len(lm.tokenizer(text)["input_ids"]) and not result.truncated
    if name == "demo-multilabel":  # sigmoid scores: independent, not a distribution
        assert sum(s.score for s in reqs[0].future.result().scores) != pytest.approx(1.0, abs=1e-3)


def test_classify_top_k_and_function_override(loaded: dict[str, LoadedModel]) -> None:
    executor = ClassificationExecutor(loaded["demo-classifier"], EngineConfig())
    one, two, raw = classify(TEXTS[0]), classify(TEXTS[0], top_k=2), classify(TEXTS[0], function_to_apply="none")
    run(executor, [one, two, raw])
    assert len(one.future.result().scores) == 1 and len(two.future.result().scores) == 2
    assert one.future.result().scores[0] == two.future.result().scores[0]
    logits = loaded["demo-classifier"].model(**loaded["demo-classifier"].tokenizer(TEXTS[0], return_tensors="pt"))
    assert raw.future.result().score == pytest.approx(logits.logits.max().item(), abs=SCORE_TOLERANCE)


def test_classify_batches_under_the_token_budget(loaded: dict[str, LoadedModel], count_forwards: Any) -> None:
    lm = loaded["demo-classifier"]
    shapes = count_forwards(lm.model)
    budget = 96
    executor = ClassificationExecutor(lm, EngineConfig(max_batch_tokens=budget, max_running_requests=3))
    reqs = [classify(t) for t in TEXTS * 3]
    steps = run(executor, reqs)
    assert all(r.future.result(timeout=0).label for r in reqs)
    assert steps == len(shapes) < len(reqs)
    for rows, cols in shapes:
        assert rows <= 3 and (rows * cols <= budget or rows == 1)
    print(f"classify: {len(reqs)} requests in {len(shapes)} forwards, padded shapes {shapes}")


def test_classify_priority_then_arrival(loaded: dict[str, LoadedModel]) -> None:
    executor = ClassificationExecutor(loaded["demo-classifier"], EngineConfig(max_running_requests=1))
    order: list[str] = []
    reqs = [classify(TEXTS[i], priority=p) for i, p in enumerate([5, 0, 5, -3, 0])]
    for req in reqs:
        req.future.add_done_callback(lambda _f, rid=req.id: order.append(rid))
    run(executor, reqs)
    assert order == [reqs[i].id for i in (3, 1, 4, 0, 2)]


def test_classify_deadline_and_abort(loaded: dict[str, LoadedModel], count_forwards: Any) -> None:
    lm = loaded["demo-classifier"]
    shapes = count_forwards(lm.model)
    executor = ClassificationExecutor(lm, EngineConfig())
    expired = classify(TEXTS[0], deadline=time.time() - 1)
    aborted, kept = classify(TEXTS[1]), classify(TEXTS[2])
    for req in (expired, aborted, kept):
        executor.add(req)
    assert executor.abort(aborted.id, TaskCancelled("cancelled by the user"))
    assert not executor.abort("no-such-request", TaskCancelled("x"))
    run(executor, [])
    with pytest.raises(DeadlineExceeded):
        expired.future.result(timeout=0)
    with pytest.raises(TaskCancelled):
        aborted.future.result(timeout=0)
    assert kept.future.result(timeout=0).label
    assert shapes == [(1, len(lm.tokenizer(TEXTS[2])["input_ids"]))]  # neither dropped request was computed


def test_classify_truncation(loaded: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-classifier"]
    text = long_text(700)
    executor = ClassificationExecutor(lm, EngineConfig())
    cut, rejected, short = classify(text, top_k=None), classify(text, truncate=False), classify(TEXTS[1])
    run(executor, [cut, rejected, short])
    result = cut.future.result(timeout=0)
    assert result.truncated and result.input_tokens == 512
    expected = pipeline("text-classification", model=lm.model, tokenizer=lm.tokenizer, top_k=None)(
        text, truncation=True
    )
    expected = expected[0] if isinstance(expected[0], list) else expected
    assert [s.score for s in result.scores] == pytest.approx([e["score"] for e in expected], abs=SCORE_TOLERANCE)
    with pytest.raises(InvalidRequest, match=r"tokens; the model's limit is 512"):
        rejected.future.result(timeout=0)
    assert not short.future.result(timeout=0).truncated


# ---- extractive QA -------------------------------------------------------------------------------
def reference_qa(lm: LoadedModel, question: str, context: str, max_answer_len: int, impossible: bool) -> dict:
    """transformers' v4 question-answering pipeline (removed in v5), one unpadded forward per window.

    Windowing and postprocessing are ported line for line; span scoring is transformers' own
    `select_starts_ends` (still shipped in v5 with the document-QA pipeline).
    """
    from transformers.pipelines.document_question_answering import select_starts_ends

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
def test_extractive_qa_matches_the_pipeline(
    loaded: dict[str, LoadedModel], count_forwards: Any, impossible: bool
) -> None:
    lm = loaded["demo-qa"]
    shapes = count_forwards(lm.model)
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=2048, max_running_requests=8))
    reqs = [
        ask(q, c, max_answer_len=10 + 5 * i, handle_impossible_answer=impossible) for i, (q, c) in enumerate(QUESTIONS)
    ]
    steps = run(executor, reqs)
    windows, executor_shapes = executor.stats()["num_windows"], list(shapes)
    assert windows >= len(QUESTIONS) + 5 and steps == len(executor_shapes) < windows  # batched across requests
    for i, (req, (question, context)) in enumerate(zip(reqs, QUESTIONS, strict=True)):
        got: QAResult = req.future.result(timeout=0)
        want = reference_qa(lm, question, context, 10 + 5 * i, impossible)
        assert (got.answer, got.start, got.end) == (want["answer"], want["start"], want["end"])
        assert got.score == pytest.approx(want["score"], abs=SCORE_TOLERANCE)
        assert got.answer == context[got.start : got.end] and got.mode == "extractive"
        print(f"QA {question!r}: {got.answer!r} {got.score:.4f} {want['score']:.4f}")
    print(f"extractive QA: {len(reqs)} requests, {windows} windows in {steps} forwards {executor_shapes}")


def test_extractive_qa_long_context_spans_steps(loaded: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-qa"]
    question, context = QUESTIONS[4]
    executor = ExtractiveQAExecutor(lm, EngineConfig(max_batch_tokens=800, max_running_requests=8))
    long_req, short_req = ask(question, context), ask(*QUESTIONS[0], priority=1)
    steps = run(executor, [long_req, short_req])
    assert steps >= 3  # 384-token windows, two per step at most
    want = reference_qa(lm, question, context, 30, False)
    assert long_req.future.result(timeout=0).answer == want["answer"]
    assert long_req.future.result(timeout=0).input_tokens > 3 * 300
    assert short_req.future.result(timeout=0).answer


def test_extractive_qa_deadline_abort_and_long_question(loaded: dict[str, LoadedModel]) -> None:
    executor = ExtractiveQAExecutor(loaded["demo-qa"], EngineConfig(max_batch_tokens=400))
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


# ---- translation ---------------------------------------------------------------------------------
def translate(text: str, **fields: Any) -> EngineRequest:
    options = {k: fields.pop(k) for k in ("source_lang", "target_lang", "truncate") if k in fields}
    generation = GenerationOptions(**fields.pop("generation", {}))
    payload = TranslateRequest(text=text, generation=generation, **options)
    return request(TaskType.TRANSLATE, payload, "demo-translator", **fields)


def reference_translation(lm: LoadedModel, text: str, **generate: Any) -> tuple[str, int]:
    """Per-request `generate`: the translation and the number of generated tokens (EOS counted)."""
    inputs = lm.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**inputs, **generate)[0, 1:].tolist()
    while out and out[-1] == lm.tokenizer.pad_token_id:
        out.pop()
    return lm.tokenizer.decode(out, skip_special_tokens=True), len(out)


def test_translate_greedy_matches_per_request_generate(loaded: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-translator"]
    executor = Seq2SeqExecutor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=16))
    reqs = [translate(t, source_lang="en", target_lang="de") for t in TEXTS]
    run(executor, reqs)
    assert executor.stats()["num_generate_calls"] == 1
    reasons = set()
    for req, text in zip(reqs, TEXTS, strict=True):
        got: TranslateResult = req.future.result(timeout=0)
        assert (got.translation, got.output_tokens) == reference_translation(lm, text)
        assert got.input_tokens == len(lm.tokenizer(text)["input_ids"]) and got.model == "demo-translator"
        reasons.add(got.finish_reason)
        assert got.finish_reason == ("length" if got.output_tokens == 32 else "stop")
    assert reasons == {"stop", "length"}  # the demo translator stops at varied lengths


def test_translate_beam_search_and_grouping(loaded: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-translator"]
    executor = Seq2SeqExecutor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=16))
    beams = [translate(t, generation={"num_beams": 3, "max_new_tokens": 12}) for t in TEXTS[:5]]
    greedy = [translate(t, generation={"max_new_tokens": 12}) for t in TEXTS[:5]]
    run(executor, [x for pair in zip(beams, greedy, strict=True) for x in pair])
    assert executor.stats()["num_generate_calls"] == 2  # one per distinct option set
    for b, g, text in zip(beams, greedy, TEXTS, strict=False):
        assert b.future.result(timeout=0).translation == reference_translation(lm, text, num_beams=3, max_length=13)[0]
        assert g.future.result(timeout=0).translation == reference_translation(lm, text, max_length=13)[0]
        assert g.future.result(timeout=0).output_tokens <= 12


def test_translate_seeded_sampling_runs_alone_and_repeats(loaded: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-translator"]
    executor = Seq2SeqExecutor(lm, EngineConfig())
    options = {"do_sample": True, "seed": 7, "temperature": 1.5, "top_k": 20, "max_new_tokens": 10}
    first, second = translate(TEXTS[2], generation=options), translate(TEXTS[2], generation=options)
    run(executor, [first, second])
    assert executor.stats()["num_generate_calls"] == 2
    assert first.future.result(timeout=0).translation == second.future.result(timeout=0).translation
    torch.manual_seed(7)
    want = reference_translation(lm, TEXTS[2], do_sample=True, temperature=1.5, top_k=20, top_p=1.0, max_length=11)
    assert first.future.result(timeout=0).translation == want[0]


def test_translate_rejections_truncation_deadline_abort(loaded: dict[str, LoadedModel]) -> None:
    lm = loaded["demo-translator"]
    executor = Seq2SeqExecutor(lm, EngineConfig())
    french = translate(TEXTS[0], source_lang="fr", target_lang="de")
    cut = translate(long_text(700), generation={"max_new_tokens": 4})
    rejected = translate(long_text(700), truncate=False)
    expired, aborted = translate(TEXTS[1], deadline=time.time() - 1), translate(TEXTS[3])
    for req in (french, cut, rejected, expired, aborted):
        executor.add(req)
    assert executor.abort(aborted.id, TaskCancelled("cancelled"))
    run(executor, [])
    with pytest.raises(UnsupportedLanguagePair, match="serves"):
        french.future.result(timeout=0)
    assert cut.future.result(timeout=0).truncated and cut.future.result(timeout=0).input_tokens == 512
    with pytest.raises(InvalidRequest, match=r"tokens; the model's limit is 512"):
        rejected.future.result(timeout=0)
    with pytest.raises(DeadlineExceeded):
        expired.future.result(timeout=0)
    with pytest.raises(TaskCancelled):
        aborted.future.result(timeout=0)
    assert executor.stats()["num_generate_calls"] == 1
