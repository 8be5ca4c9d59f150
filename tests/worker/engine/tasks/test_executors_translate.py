"""The translation executor against per-request `model.generate` on the same Marian model.

(transformers 5 removed the translation pipeline; `generate` is the reference.) The executor switches its
model to the paged engine's attention, so references run on a second copy loaded from the same files.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from executor_support import TEXTS, forward_shapes, load_demo, long_text, request, run
from transformers import GenerationConfig, UMT5Config, UMT5ForConditionalGeneration

from pagedq.shared.errors import DeadlineExceeded, InvalidRequest, TaskCancelled, UnsupportedLanguagePair
from pagedq.shared.models import GenerationOptions, TaskType, TranslateRequest, TranslateResult
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel
from pagedq.worker.engine.tasks import batching as _batching
from pagedq.worker.engine.tasks.translate import Seq2SeqExecutor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm(demo_models: Path) -> LoadedModel:
    return load_demo(demo_models, "demo-translator")


@pytest.fixture(scope="module")
def ref(demo_models: Path) -> LoadedModel:
    """An untouched copy for `generate`."""
    return load_demo(demo_models, "demo-translator")


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


def test_translate_greedy_matches_per_request_generate(lm: LoadedModel, ref: LoadedModel) -> None:
    executor = Seq2SeqExecutor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=16))
    assert executor.engine is not None, "Marian runs on the paged engine"
    reqs = [translate(t, source_lang="en", target_lang="de") for t in TEXTS]
    with forward_shapes(lm.model.get_decoder()) as shapes:
        run(executor, reqs)
    assert shapes[0] == (1, len(TEXTS)), "one packed decoder pass: a row per request, no padding"
    stats = executor.stats().as_dict()
    assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0.0
    assert stats["num_fallback_requests"] == 0 and stats["steps"] == len(shapes)
    reasons = set()
    for req, text in zip(reqs, TEXTS, strict=True):
        got: TranslateResult = req.future.result(timeout=0)
        assert (got.translation, got.output_tokens) == reference_translation(ref, text)
        assert got.input_tokens == len(lm.tokenizer(text)["input_ids"]) and got.model == "demo-translator"
        reasons.add(got.finish_reason)
        assert got.finish_reason == ("length" if got.output_tokens == 32 else "stop")
    assert reasons == {"stop", "length"}  # the demo translator stops at varied lengths


def test_translate_admits_a_bulk_a_window_per_step_most_urgent_first(lm: LoadedModel) -> None:
    """A bulk is tokenized and admitted `lookahead` requests per step, most urgent first: an urgent request
    added behind 600 others is admitted (and tokenized) in the first step, the rest over the next steps."""
    executor = Seq2SeqExecutor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=16))
    tokenized: list[int] = []
    tokenize = executor._tokenize
    executor._tokenize = lambda texts: tokenized.append(len(texts)) or tokenize(texts)  # type: ignore[method-assign]
    bulk = [translate(TEXTS[i % len(TEXTS)], priority=5) for i in range(600)]
    urgent = translate(TEXTS[0], priority=0)
    for req in [*bulk, urgent]:
        executor.add(req)
    executor.step()
    window = _batching.lookahead(16)
    assert tokenized == [window] and len(executor._new) == len(bulk) + 1 - window
    assert urgent.future.done() or urgent.id in executor._paged  # admitted to the paged engine in the first step
    run(executor, [], max_steps=5000)
    assert sum(tokenized) == len(bulk) + 1 and max(tokenized) <= window
    assert all(isinstance(r.future.result(timeout=0), TranslateResult) for r in [*bulk, urgent])


def test_translate_beam_search_and_greedy_in_one_batch(lm: LoadedModel, ref: LoadedModel) -> None:
    executor = Seq2SeqExecutor(lm, EngineConfig(max_batch_tokens=1024, max_running_requests=16))
    beams = [translate(t, generation={"num_beams": 3, "max_new_tokens": 12}) for t in TEXTS[:5]]
    greedy = [translate(t, generation={"max_new_tokens": 12}) for t in TEXTS[:5]]
    run(executor, [x for pair in zip(beams, greedy, strict=True) for x in pair])
    assert executor.stats().as_dict()["num_fallback_requests"] == 0
    for b, g, text in zip(beams, greedy, TEXTS, strict=False):
        assert b.future.result(timeout=0).translation == reference_translation(ref, text, num_beams=3, max_length=13)[0]
        assert g.future.result(timeout=0).translation == reference_translation(ref, text, max_length=13)[0]
        assert g.future.result(timeout=0).output_tokens <= 12


def test_translate_seeded_sampling_repeats_whatever_shares_the_batch(lm: LoadedModel, ref: LoadedModel) -> None:
    executor = Seq2SeqExecutor(lm, EngineConfig())
    options = {"do_sample": True, "seed": 7, "temperature": 1.5, "top_k": 20, "max_new_tokens": 10}
    first, second = translate(TEXTS[2], generation=options), translate(TEXTS[2], generation=options)
    others = [translate(t, generation={"do_sample": True, "max_new_tokens": 10}) for t in TEXTS[:3]]
    run(executor, [first, *others, second])
    assert first.future.result(timeout=0).translation == second.future.result(timeout=0).translation
    torch.manual_seed(7)
    want = reference_translation(ref, TEXTS[2], do_sample=True, temperature=1.5, top_k=20, top_p=1.0, max_length=11)
    assert first.future.result(timeout=0).translation == want[0]


def test_translate_unsupported_options_fall_back_to_generate(lm: LoadedModel, ref: LoadedModel) -> None:
    """A generation config option the engine does not implement: batched `generate` on the model as loaded."""
    executor = Seq2SeqExecutor(lm, EngineConfig())
    lm.model.generation_config.repetition_penalty = 1.3
    ref.model.generation_config.repetition_penalty = 1.3
    try:
        reqs = [translate(t, generation={"max_new_tokens": 8}) for t in TEXTS[:3]]
        run(executor, reqs)
        assert executor.stats().as_dict()["num_fallback_requests"] == 3
        for req, text in zip(reqs, TEXTS, strict=False):
            assert req.future.result(timeout=0).translation == reference_translation(ref, text, max_length=9)[0]
    finally:
        lm.model.generation_config.repetition_penalty = None
        ref.model.generation_config.repetition_penalty = None
    greedy = translate(TEXTS[0], generation={"max_new_tokens": 8})
    run(executor, [greedy])  # the paged path still works after the fallback borrowed the model
    assert greedy.future.result(timeout=0).translation == reference_translation(ref, TEXTS[0], max_length=9)[0]


def test_translate_rejections_truncation_deadline_abort(lm: LoadedModel) -> None:
    executor = Seq2SeqExecutor(lm, EngineConfig())
    french = translate(TEXTS[0], source_lang="fr", target_lang="de")
    cut = translate(long_text(700), generation={"max_new_tokens": 4})
    rejected = translate(long_text(700), truncate=False)
    expired, aborted = translate(TEXTS[1], deadline=time.time() - 1), translate(TEXTS[3])
    for req in (french, cut, rejected, expired, aborted):
        executor.add(req)
    assert executor.abort(expired.id, DeadlineExceeded("deadline passed"))  # what the engine loop does
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
    assert executor.engine is not None and executor.engine.kv.pool.usage == 0.0


def test_translate_abort_mid_flight_frees_blocks(lm: LoadedModel) -> None:
    executor = Seq2SeqExecutor(lm, EngineConfig())
    reqs = [translate(t, generation={"max_new_tokens": 30}) for t in TEXTS]
    for req in reqs:
        executor.add(req)
    executor.step()
    executor.step()
    assert executor.engine is not None and executor.engine.kv.pool.usage > 0
    for req in reqs:
        if not req.future.done():
            assert executor.abort(req.id, TaskCancelled("cancelled"))
    assert executor.engine.kv.pool.usage == 0.0  # at once, before any further step
    executor.step()  # the engine reports the aborts
    assert not executor.has_work()


def test_translate_priority_first_and_beams_count_against_the_cap(lm: LoadedModel) -> None:
    executor = Seq2SeqExecutor(lm, EngineConfig(max_running_requests=4))
    beams = [translate(t, generation={"num_beams": 2, "max_new_tokens": 5}) for t in TEXTS[:3]]
    urgent = translate(TEXTS[3], priority=-1, generation={"max_new_tokens": 5})
    for req in [*beams, urgent]:
        executor.add(req)
    executor.step()
    assert executor.engine is not None
    running = {r.request_id for r in executor.engine.scheduler.running}
    assert urgent.id in running, "priority beats arrival, whatever the options"
    assert running == {urgent.id, beams[0].id}, "1 + 2 seats taken; a second beam request would need 5 > 4"
    run(executor, [])
    assert all(r.future.result(timeout=0).output_tokens <= 5 for r in beams)


def test_an_architecture_the_engine_cannot_page_runs_on_batched_generate(lm: LoadedModel) -> None:
    """UMT5 is not a paged architecture (and its config has no `decoder_attention_heads`, which once stopped
    the worker from starting): the executor keeps its model as loaded and batches `generate`."""
    tokenizer = lm.tokenizer
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = UMT5ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_length=9,
        suppress_tokens=[tokenizer.pad_token_id],
    )  # fmt: skip  (random weights emit the pad token; the reference drops trailing pads)
    reference = copy.deepcopy(model)
    umt5 = LoadedModel(lm.spec, model, tokenizer, lm.device, lm.dtype)
    executor = Seq2SeqExecutor(umt5, EngineConfig())
    assert executor.engine is None
    stats = executor.stats()
    assert stats.path == "generate" and "relative attention bias" in stats.path_reason
    reqs = [translate(t) for t in TEXTS[:4]]
    run(executor, reqs)
    assert executor.stats().as_dict()["num_fallback_requests"] == 4 and executor.stats().as_dict()["steps"] == 1
    for req, text in zip(reqs, TEXTS, strict=False):
        want = reference_translation(LoadedModel(lm.spec, reference, tokenizer, lm.device, lm.dtype), text)
        assert (req.future.result(timeout=0).translation, req.future.result(timeout=0).output_tokens) == want


def test_a_request_option_no_path_implements_is_refused(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never ignored in silence: `_generation.REQUEST_OPTIONS` lists how each option is honoured."""
    from pagedq.worker.engine.decoding import seq2seq_options as _generation

    monkeypatch.delitem(_generation.REQUEST_OPTIONS, "top_p")
    executor = Seq2SeqExecutor(lm, EngineConfig())
    refused, served = translate(TEXTS[0], generation={"do_sample": True, "top_p": 0.5}), translate(TEXTS[1])
    run(executor, [refused, served])
    with pytest.raises(InvalidRequest, match="top_p"):
        refused.future.result(timeout=0)
    assert served.future.result(timeout=0).output_tokens > 0


def test_the_executor_says_which_path_serves_the_model(lm: LoadedModel) -> None:
    executor = Seq2SeqExecutor(lm, EngineConfig())
    stats = executor.stats().as_dict()
    assert stats["path"] == "paged" and stats["path_reason"].startswith("self-check passed")
    assert stats["steps"] == 0 and stats["num_requests_finished"] == 0, "the probe is not counted"


def test_a_future_cancelled_by_its_caller_stops_its_request(lm: LoadedModel) -> None:
    executor = Seq2SeqExecutor(lm, EngineConfig())
    kept, dropped = translate(TEXTS[0], generation={"max_new_tokens": 20}), translate(TEXTS[2])
    for req in (kept, dropped):
        executor.add(req)
    executor.step()
    assert dropped.future.cancel()
    executor.step()
    assert executor.engine is not None and {r.request_id for r in executor.engine.scheduler.running} <= {kept.id}
    run(executor, [])
    assert kept.future.result(timeout=0).output_tokens <= 20
