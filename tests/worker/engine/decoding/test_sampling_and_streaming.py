"""Sampling (top-k/top-p like transformers, seeds), stop ids/strings, streaming, dtypes, engine priorities."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.sampling import (
    GREEDY_BELOW_TEMPERATURE,
    SamplingParams,
    filtered_probs,
    scaled_logits,
)
from worker.engine.helpers import TinyModel, random_prompts
from worker.engine.tiny_tokenizer import build_tokenizer


def test_filters_match_transformers_warpers() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5), (0, 0.01)]:
        ref = logits[None] / 0.8
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        torch.testing.assert_close(filtered_probs(logits, 0.8, top_k, top_p), ref.softmax(-1)[0])


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-30, 1e-12, GREEDY_BELOW_TEMPERATURE])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.5), (5, 0.3)])
def test_tiny_temperatures_stay_finite_and_pick_the_argmax(temperature: float, top_k: int, top_p: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(50) * 4
    logits[[3, 17]] = float("-inf")  # banned tokens (generate's processors) stay banned
    probs = filtered_probs(logits, temperature, top_k, top_p)
    assert torch.isfinite(probs).all()
    assert probs[logits.argmax()] == 1.0 and probs.sum() == 1.0


def test_scaled_logits_keep_the_distribution_of_ordinary_temperatures() -> None:
    torch.manual_seed(2)
    logits = (torch.randn(50) * 4).to(torch.bfloat16)
    scaled = scaled_logits(logits, 0.7)
    assert scaled.dtype == torch.float32 and scaled.max() == 0.0
    torch.testing.assert_close(scaled.softmax(-1), (logits.float() / 0.7).softmax(-1))


def engine_for(tm: TinyModel, **kw: object) -> LLMEngine:
    return LLMEngine(tm.model, config=EngineConfig(block_size=4, **kw), num_blocks=128)  # type: ignore[arg-type]


def test_seeded_sampling_ignores_batch_companions(tiny_models: dict[str, TinyModel]) -> None:
    tm = tiny_models["llama"]
    prompts = random_prompts([7, 12, 4], seed=11)
    seeded = SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.9, seed=42)
    other = SamplingParams(max_new_tokens=10, temperature=1.0)
    alone = engine_for(tm).generate([prompts[0]], seeded)[0].output_token_ids
    crowd = engine_for(tm).generate(prompts, [seeded, other, other])[0].output_token_ids
    assert alone == crowd
    top1 = engine_for(tm).generate([prompts[0]], SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1))
    assert top1[0].output_token_ids == tm.expected(prompts[0], 10)


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e-6])
def test_tiny_temperature_sampling_returns_the_greedy_tokens(
    tiny_models: dict[str, TinyModel], temperature: float
) -> None:
    tm = tiny_models["llama"]
    prompts = random_prompts([7, 12, 4], seed=15)
    params = [SamplingParams(max_new_tokens=10, temperature=temperature, top_k=k, top_p=p, seed=s)
              for k, p, s in [(0, 1.0, None), (20, 0.9, 7), (0, 0.5, None)]]  # fmt: skip
    outs = engine_for(tm).generate(prompts, params)
    assert [o.output_token_ids for o in outs] == [tm.expected(prompt, 10) for prompt in prompts]


def test_stop_token_ids_and_streaming(tiny_models: dict[str, TinyModel]) -> None:
    tm = tiny_models["gpt2"]
    prompt = random_prompts([6], seed=12)[0]
    full = tm.expected(prompt, 10)
    engine = engine_for(tm)
    streamed: list[tuple[str, int]] = []
    engine.add_request("s", prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(full[3],)),
                       on_token=lambda rid, tok: streamed.append((rid, tok)))  # fmt: skip
    seen = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            # Every step's output carries exactly the tokens streamed so far: streaming is not batched up.
            assert [t for _, t in streamed] == out.output_token_ids
            seen = len(out.output_token_ids)
            final = out
    stop_at = full.index(full[3])
    assert final.output_token_ids == full[: stop_at + 1] and final.finish_reason == "stop"
    assert seen == stop_at + 1 and {rid for rid, _ in streamed} == {"s"}


def test_stop_strings_cut_the_text(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path)
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    reference = copy.deepcopy(model)
    prompt = tokenizer.encode("Question: Who wrote the first program?\nAnswer:")
    with torch.no_grad():
        ids = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=2)
    text = tokenizer.decode(ids[0, len(prompt) :], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=4), num_blocks=64)
    (out,) = engine.generate([prompt], SamplingParams(max_new_tokens=16, stop=(stop,)))
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]
    assert len(out.output_token_ids) < 16
    (kept,) = engine.generate(
        [prompt], SamplingParams(max_new_tokens=16, stop=(stop,), include_stop_str_in_output=True)
    )
    assert kept.text == text[: text.find(stop) + len(stop)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(tiny_models: dict[str, TinyModel], dtype: torch.dtype) -> None:
    model = copy.deepcopy(tiny_models["qwen2"].reference).to(dtype)
    engine = LLMEngine(model, config=EngineConfig(block_size=4, max_batch_tokens=16), num_blocks=64)
    assert engine.cache.key_cache.dtype == dtype
    outs = engine.generate(random_prompts([5, 19, 9], seed=13), SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [len(o.output_token_ids) for o in outs] == [6, 6, 6]
    assert all(0 <= t < model.config.vocab_size for o in outs for t in o.output_token_ids)


def test_engine_priority_and_abort(tiny_models: dict[str, TinyModel]) -> None:
    tm = tiny_models["llama"]
    engine = engine_for(tm, max_running_requests=1)
    p = random_prompts([5, 6, 7], seed=14)
    engine.add_request("low", p[0], SamplingParams(max_new_tokens=30), priority=5)
    engine.step()
    engine.add_request("high", p[1], SamplingParams(max_new_tokens=3), priority=0)
    engine.add_request("late", p[2], SamplingParams(max_new_tokens=3))
    assert engine.abort_request("late")  # a cancel, or the engine loop's deadline
    finished = []
    while engine.has_unfinished_requests():
        finished += [(o.request_id, o.finish_reason) for o in engine.step() if o.finished]
    assert finished == [("late", "abort"), ("high", "length"), ("low", "length")]
    stats = engine.stats()
    assert stats.num_preemptions == 1 and stats.num_generated_tokens >= 33
    with pytest.raises(ValueError):
        engine.add_request("huge", [1] * 300, SamplingParams())  # over max_model_len (256)
