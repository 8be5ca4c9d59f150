"""Greedy output token for token equal to `model.generate`, under everything the engine does."""

from __future__ import annotations

import pytest

from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.cpu.native import paged_decode_available
from pagedq.worker.engine.decoder_only import runner as model_runner
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.paged.decode_plan import DecodePlan
from worker.engine.helpers import BUILDERS, TinyModel, random_prompts, run


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("native", [None, False], ids=["auto", "portable"])
@pytest.mark.parametrize("cascade", [0, 4], ids=["plain", "cascade"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_concurrent_chunked_prefix_hits(
    arch: str, cascade: int, native: bool | None, tiny_models: dict[str, TinyModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Different lengths joining mid-flight, prompts chunked by a small budget, shared prefixes
    (attended per row, or once per group of rows sharing them: `cascade`); decode rows through the
    native kernel where it is built (`auto`, fp32 on CPU) and through the portable gather + SDPA path."""
    tm = tiny_models[arch]
    shared = random_prompts([13], seed=7)[0]  # 3 full blocks of 4 + 1
    prompts = random_prompts([3, 21, 9, 40], seed=2) + random_prompts([5, 2, 11], seed=3, prefix=shared)
    new = [12, 7, 16, 5, 9, 14, 3]
    config = EngineConfig(max_batch_tokens=24, max_running_requests=5, block_size=4)
    engine = LLMEngine(
        tm.model, config=config, num_blocks=128, namespace=arch, cascade_min_tokens=cascade, native_decode=native
    )
    assert engine.runner.native_decode == (native is None and paged_decode_available())
    plans: list[DecodePlan] = []
    real_plan = model_runner.plan_decode
    monkeypatch.setattr(model_runner, "plan_decode", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    arrivals = {
        0: [("p0", prompts[0], greedy(new[0])), ("p1", prompts[1], greedy(new[1])), ("s0", prompts[4], greedy(new[4]))],
        3: [("p2", prompts[2], greedy(new[2])), ("s1", prompts[5], greedy(new[5]))],
        6: [("p3", prompts[3], greedy(new[3])), ("s2", prompts[6], greedy(new[6]))],
    }
    done = run(engine, arrivals)
    names = ["p0", "p1", "p2", "p3", "s0", "s1", "s2"]
    for name, prompt, n in zip(names, prompts, new, strict=True):
        assert done[name].output_token_ids == tm.expected(prompt, n), f"{arch} {name}"
        assert done[name].finish_reason == "length"
    stats = engine.stats()
    assert stats.prefix_cache_hits >= 2 * 12  # s1 and s2 reuse the shared prefix's full blocks
    assert done["s1"].num_cached_tokens == 12 and done["s2"].num_cached_tokens == 12
    assert stats.kv_cache_usage_perc == 0.0  # everything freed
    assert any(p.cascades for p in plans) == bool(cascade)


def test_preemption_under_tiny_pool(tiny_models: dict[str, TinyModel]) -> None:
    tm = tiny_models["llama"]
    prompts = random_prompts([10, 14, 6, 17, 9], seed=4)
    new = [14, 10, 18, 9, 12]
    config = EngineConfig(max_batch_tokens=64, max_running_requests=8, block_size=4)
    engine = LLMEngine(tm.model, config=config, num_blocks=14, namespace="preempt")
    arrivals = {0: [(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(prompts, new, strict=True))]}
    done = run(engine, arrivals)
    assert engine.stats().num_preemptions > 0
    for i, (p, n) in enumerate(zip(prompts, new, strict=True)):
        assert done[f"r{i}"].output_token_ids == tm.expected(p, n)


def test_cancellation_mid_generation(tiny_models: dict[str, TinyModel]) -> None:
    tm = tiny_models["qwen2"]
    prompts = random_prompts([8, 12, 5, 19], seed=5)
    config = EngineConfig(max_batch_tokens=32, block_size=4)
    engine = LLMEngine(tm.model, config=config, num_blocks=64, namespace="cancel")
    arrivals = {0: [(f"r{i}", p, greedy(12)) for i, p in enumerate(prompts)]}
    done = run(engine, arrivals, aborts={4: ["r1"], 6: ["r3"]})
    assert done["r1"].finish_reason == "abort" and done["r3"].finish_reason == "abort"
    assert 0 < len(done["r1"].output_token_ids) < 12
    # What an aborted request did produce is the start of the greedy continuation.
    assert done["r1"].output_token_ids == tm.expected(prompts[1], 12)[: len(done["r1"].output_token_ids)]
    for i in (0, 2):
        assert done[f"r{i}"].output_token_ids == tm.expected(prompts[i], 12)
    assert engine.kv.pool.num_free_blocks == 64


def test_eos_from_generation_config_stops(tiny_models: dict[str, TinyModel]) -> None:
    tm = tiny_models["llama"]
    prompt = random_prompts([9], seed=6)[0]
    full = tm.expected(prompt, 10)
    eos = full[4]
    stop_at = full.index(eos)
    tm.model.generation_config.eos_token_id = eos  # the engine reads it at construction
    try:
        engine = LLMEngine(tm.model, config=EngineConfig(block_size=4), num_blocks=32, namespace="eos")
        (out,) = engine.generate([prompt], SamplingParams(max_new_tokens=10))
        (ignored,) = engine.generate([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True))
    finally:
        tm.model.generation_config.eos_token_id = None
    assert out.output_token_ids == full[: stop_at + 1] and out.finish_reason == "stop"
    assert ignored.output_token_ids == full and ignored.finish_reason == "length"
