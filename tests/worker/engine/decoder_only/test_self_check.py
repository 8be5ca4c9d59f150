"""The load-time self-check: it passes exact models, leaves the engine clean, and refuses broken paths."""

from __future__ import annotations

import time

import pytest
import torch

from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.decoder_only import attention
from pagedq.worker.engine.decoder_only import engine as llm_engine
from pagedq.worker.engine.decoder_only.attention import PagedKVCache, ScoreRule, UnsupportedAttention
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoder_only.self_check import PROBE_LENGTHS, UnsupportedModel, self_check
from worker.engine.families import build_family
from worker.engine.helpers import one_torch_thread

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


def engine_for(name: str, **kw: object) -> LLMEngine:
    config = EngineConfig(block_size=4, max_batch_tokens=16)
    return LLMEngine(build_family(name).model, config=config, num_blocks=64, namespace=name, **kw)  # type: ignore[arg-type]


def patch_rule(monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """Break the paged attention path the way a bug would: drop the model's scale, soft-cap or sinks."""
    real = ScoreRule.of.__func__  # type: ignore[attr-defined]

    def broken(cls: type, module: object, query: torch.Tensor, scaling: float | None, kwargs: dict) -> ScoreRule:
        if change == "scale":
            scaling = None
        kwargs = {k: v for k, v in kwargs.items() if k != change}
        return real(cls, module, query, scaling, kwargs)

    monkeypatch.setattr(attention.ScoreRule, "of", classmethod(broken))


@pytest.mark.parametrize(
    ("name", "change"), [("granite", "scale"), ("gemma2", "scale"), ("gemma2", "softcap"), ("gpt_oss", "s_aux")]
)
def test_a_broken_attention_path_is_refused(
    name: str, change: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine_for(name)  # exact as it is
    patch_rule(monkeypatch, change)
    with pytest.raises(UnsupportedModel, match="not exact on the paged path"):
        engine_for(name)
    refusals = [r for r in caplog.records if "refusing model" in r.getMessage()]
    assert len(refusals) == 1 and name in refusals[0].getMessage()


def test_longrope_is_caught_by_the_probe_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the static rotary gate, the probe's request past the switch point (33 tokens) changes
    the short requests that share its steps."""
    monkeypatch.setattr(llm_engine, "check_rotary", lambda model, max_len: None)
    with pytest.raises(UnsupportedModel, match="not exact on the paged path"):
        engine_for("phi3_longrope")


def test_an_attention_keyword_paged_attention_cannot_honour_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ScoreRule.of.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        attention.ScoreRule,
        "of",
        classmethod(lambda cls, m, q, s, kw: real(cls, m, q, s, {**kw, "attention_chunk_size": 8})),
    )
    with pytest.raises(UnsupportedModel, match=r"fails on the paged path: UnsupportedAttention.*attention_chunk_size"):
        engine_for("llama")


def test_score_rule_refuses_bidirectional_attention() -> None:
    module = torch.nn.Module()
    module.is_causal = False  # type: ignore[assignment]
    with pytest.raises(UnsupportedAttention, match="bidirectionally"):
        ScoreRule.of(module, torch.zeros(1, 1, 1, 4), None, {})


def test_update_without_kwargs_outside_a_step_says_why() -> None:
    cache = PagedKVCache(1, 2, 4, 1, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="outside a step"):
        cache.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 0)


def test_probe_is_deterministic_and_leaves_the_engine_clean() -> None:
    engine = engine_for("llama_yarn", self_check=False)
    first, second = self_check(engine), self_check(engine)
    assert first == second
    assert first.prompt_lengths == [*PROBE_LENGTHS, 33]  # one past the YaRN threshold (32)
    assert 0 <= first.max_logit_error < first.tolerance
    assert not engine.has_unfinished_requests() and engine.kv.pool.num_free_blocks == 64
    stats = engine.stats()
    assert stats.num_steps == stats.prefix_cache_queries == stats.num_preemptions == 0


def test_probe_fits_a_small_pool_and_a_short_max_model_len() -> None:
    engine = LLMEngine(build_family("llama").model, config=EngineConfig(block_size=4), num_blocks=5, max_model_len=12)
    assert max(self_check(engine).prompt_lengths) <= 12 - 1 - 3


def test_probe_costs_well_under_a_second_on_a_small_model() -> None:
    engine = engine_for("llama", self_check=False)
    self_check(engine)  # warm (first-call allocations, the native kernel's load)
    start = time.perf_counter()
    self_check(engine)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"self-check took {elapsed:.2f} s"
