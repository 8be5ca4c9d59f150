"""GenerativeExecutor with a real (offline) tokenizer and a model loaded from disk."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from pagedq.shared.errors import DeadlineExceeded, InvalidRequest, TaskCancelled
from pagedq.shared.models import ClassifyRequest, GenerationOptions, QARequest, QAResult, TaskType, TranslateRequest
from pagedq.shared.registry import ModelSpec
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel
from pagedq.worker.engine.service import Engine
from pagedq.worker.engine.tasks.generative import QA_STOP, GenerativeExecutor
from worker.engine.tiny_tokenizer import build_tokenizer

MAX_NEW = 12
CONTEXT = "Ada Lovelace wrote the first program for the Analytical Engine in 1843."


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    out: Path = tmp_path_factory.mktemp("tiny-llm")
    tokenizer = build_tokenizer(out)
    torch.manual_seed(3)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, **ids,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(max_new_tokens=MAX_NEW, pad_token_id=tokenizer.pad_token_id, **ids)
    model.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    spec = ModelSpec(name="tiny-llm", task=TaskType.QA, source=str(out), architecture="causal-lm")
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture()
def reference(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An independent copy of the model (the executor switches its attention implementation)."""
    return AutoModelForCausalLM.from_pretrained(loaded.spec.source).eval()


def executor(loaded: LoadedModel, **config: Any) -> GenerativeExecutor:
    return GenerativeExecutor(loaded, EngineConfig(block_size=4, **config), num_blocks=256)


def qa(question: str, context: str = CONTEXT, rid: str | None = None, **fields: Any) -> EngineRequest:
    generation = GenerationOptions(**fields.pop("generation", {}))
    extra = {k: fields.pop(k) for k in ("priority", "deadline") if k in fields}
    payload = QARequest(question=question, context=context, mode="generative", generation=generation, **fields)
    return EngineRequest(id=rid or f"qa-{question}-{time.monotonic_ns()}", task=TaskType.QA, payload=payload,
                         model="tiny-llm", **extra)  # fmt: skip


def drain(ex: GenerativeExecutor, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not ex.has_work():
            return
        ex.step()
    raise AssertionError("executor did not finish")


def expected_answer(loaded: LoadedModel, reference: Any, question: str, context: str = CONTEXT) -> tuple[str, int]:
    """Per-request greedy `generate`, cut where the executor must stop (EOS or a QA stop string)."""
    tok = loaded.tokenizer
    prompt = tok.encode(f"Context: {context}\nQuestion: {question}\nAnswer:")
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), do_sample=False)[0, len(prompt) :].tolist()
    while out and out[-1] == tok.pad_token_id:
        out.pop()
    for n in range(1, len(out) + 1):  # the first token after which a stop string is in the text
        text = tok.decode(out[:n], skip_special_tokens=True)
        if any(s in text for s in QA_STOP):
            out = out[:n]
            text = text[: min(text.find(s) for s in QA_STOP if s in text)]
            return text.strip(), n
    return tok.decode(out, skip_special_tokens=True).strip(), len(out)


def test_generative_qa_matches_generate_and_hits_prefix_cache(loaded: LoadedModel, reference: Any) -> None:
    ex = executor(loaded, max_batch_tokens=64)
    questions = ["Who wrote the first program?", "When?", "For which engine was it written?", "Why?"]
    reqs = [qa(q) for q in questions]
    for r in reqs:
        ex.add(r)
    drain(ex)
    for r, q in zip(reqs, questions, strict=True):
        got: QAResult = r.future.result(timeout=0)
        answer, n = expected_answer(loaded, reference, q)
        assert (got.answer, got.output_tokens) == (answer, n)
        assert got.mode == "generative" and got.model == "tiny-llm" and not got.truncated
        assert 1 <= got.output_tokens <= MAX_NEW
        assert got.input_tokens == len(loaded.tokenizer.encode(f"Context: {CONTEXT}\nQuestion: {q}\nAnswer:"))
    stats = ex.stats().as_dict()
    assert stats["prefix_cache_hits"] > 0  # the context's blocks are shared by later questions
    assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0.0


def test_truncation_cuts_the_context_start_or_rejects(loaded: LoadedModel) -> None:
    ex = executor(loaded)
    long_context = "The engine schedules every request. " * 80  # far over 256 tokens
    cut, strict = qa("Who?", context=long_context), qa("Who?", context=long_context, truncate=False)
    ex.add(cut)
    ex.add(strict)
    with pytest.raises(InvalidRequest):
        strict.future.result(timeout=0)
    drain(ex)
    got: QAResult = cut.future.result(timeout=0)
    assert got.truncated and got.input_tokens == ex.max_input_tokens == 255


def test_translate_request(loaded: LoadedModel) -> None:
    ex = executor(loaded)
    payload = TranslateRequest(text="The cat sleeps.", source_lang="en", target_lang="de",
                               generation=GenerationOptions(max_new_tokens=5))  # fmt: skip
    req = EngineRequest(id="t1", task=TaskType.TRANSLATE, payload=payload, model="tiny-llm")
    ex.add(req)
    drain(ex)
    got = req.future.result(timeout=0)
    assert got.type == "translate" and 1 <= got.output_tokens <= 5
    assert got.finish_reason in ("stop", "length") and got.input_tokens > 5


def test_abort_expiry_and_bad_requests(loaded: LoadedModel) -> None:
    ex = executor(loaded)
    running = qa("Who?", generation={"max_new_tokens": 50})
    expired = qa("When?", deadline=time.time() - 1)
    ex.add(running)
    ex.add(expired)
    assert ex.abort(expired.id, DeadlineExceeded("deadline passed"))  # what the engine loop does
    ex.step()
    assert ex.abort(running.id, TaskCancelled("user")) and not ex.abort("nope", TaskCancelled("x"))
    drain(ex)
    with pytest.raises(TaskCancelled):
        running.future.result(timeout=0)
    with pytest.raises(DeadlineExceeded):
        expired.future.result(timeout=0)
    assert ex.engine.kv.pool.num_free_blocks == ex.engine.kv.pool.num_blocks
    wrong = EngineRequest(id="c", task=TaskType.CLASSIFY, payload=ClassifyRequest(text="hi"), model="tiny-llm")
    ex.add(wrong)
    with pytest.raises(InvalidRequest):
        wrong.future.result(timeout=0)
    beams = qa("Beams?", generation={"num_beams": 2, "max_new_tokens": 6})  # beam search runs (exactness:
    ex.add(beams)  # tests/worker/engine/decoding/test_causal_generation_config.py)
    drain(ex)
    assert 1 <= beams.future.result(timeout=0).output_tokens <= 6


def test_seeded_sampling_is_reproducible(loaded: LoadedModel) -> None:
    options = {"do_sample": True, "temperature": 1.5, "top_k": 50, "seed": 7, "max_new_tokens": 8}
    answers = []
    for companions in (0, 3):  # the same seed gives the same answer whatever shares the batch
        ex = executor(loaded)
        r = qa("Who?", generation=options)
        ex.add(r)
        for i in range(companions):
            ex.add(qa(f"Other {i}?", generation={"do_sample": True, "max_new_tokens": 8}))
        drain(ex)
        answers.append(r.future.result(timeout=0).answer)
    assert answers[0] == answers[1]


def test_streamed_text_equals_the_final_answer(loaded: LoadedModel, redis_url: str) -> None:
    import redis

    from pagedq.shared.records import stream_key
    from pagedq.worker.streaming import TokenStreamer
    from worker.test_streaming import read_stream

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    streamer = TokenStreamer(r, ttl_s=60).start()
    ex = executor(loaded)
    requests = [qa(q, generation={"max_new_tokens": 24, "stream": True})
                for q in ("Who wrote it?", "When?", "What did Ada write for the engine?")]
    for request in requests:
        request.stream = streamer.sink(request.id)
        ex.add(request)
    drain(ex)
    try:
        for request in requests:
            answer = request.future.result().answer
            streamer.close(request.id, "succeeded", answer)
            assert read_stream(r, request.id) == (answer, "succeeded")
            assert r.xlen(stream_key(request.id)) >= 2  # it streamed, not one piece at the end
    finally:
        streamer.stop()


def test_deadlines_through_the_engine_loop_free_the_kv_cache(loaded: LoadedModel) -> None:
    """The engine loop owns deadlines (worker/engine/service.py): a request whose deadline passes while it
    generates, and one that arrives expired, fail with DeadlineExceeded through the executor's abort, their
    blocks are free at once, and a request without a deadline is unaffected."""
    ex = executor(loaded)
    engine = Engine({"tiny-llm": ex}).start()
    try:
        slow = qa("Slow?", generation={"max_new_tokens": 200}, deadline=time.time() + 0.05)
        late = qa("Late?", deadline=time.time() - 1)
        kept = qa("Kept?", generation={"max_new_tokens": 4})
        futures = [engine.submit(r) for r in (slow, late, kept)]
        for future in futures[:2]:
            with pytest.raises(DeadlineExceeded):
                future.result(timeout=30)
        assert 1 <= futures[2].result(timeout=30).output_tokens <= 4
        wait_until = time.monotonic() + 10
        while ex.engine.has_unfinished_requests() and time.monotonic() < wait_until:
            time.sleep(0.01)
        assert ex.engine.kv.pool.num_free_blocks == ex.engine.kv.pool.num_blocks
        assert ex.engine.stats().num_generated_tokens < 200, "the slow request ran to its end"
    finally:
        engine.stop()
