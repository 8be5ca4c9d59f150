"""The load-time self-check: it passes on the paged families, costs milliseconds, and catches an attention
path that is only slightly wrong -- the executor then serves the model on `generate`, and says so."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from executor_support import TEXTS, load_demo, request, run
from seq2seq_support import build_pair

from pagedq.shared.models import GenerationOptions, TaskType, TranslateRequest
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.seq2seq import attention as seq2seq_attention
from pagedq.worker.engine.seq2seq.attention import ATTENTION_NAME
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine
from pagedq.worker.engine.seq2seq.self_check import self_check
from pagedq.worker.engine.tasks.translate import Seq2SeqExecutor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = EngineConfig(max_batch_tokens=256, max_running_requests=16, block_size=4)


def _cross_values_one_percent_off(monkeypatch: pytest.MonkeyPatch) -> None:
    original = seq2seq_attention._cross_attention

    def broken(meta: Any, layer: int, query: torch.Tensor, scaling: float | None, out: torch.Tensor) -> None:
        original(meta, layer, query, scaling, out)
        out.mul_(1.01)  # sum_j p_j (1.01 v_j): every value 1% off

    monkeypatch.setattr(seq2seq_attention, "_cross_attention", broken)


def _encoder_scale_two_percent_off(monkeypatch: pytest.MonkeyPatch) -> None:
    original = seq2seq_attention._encoder_attention

    def broken(bucket: Any, query: torch.Tensor, *args: Any) -> None:
        key, value, scaling, *rest = args
        scale = (scaling if scaling is not None else query.shape[-1] ** -0.5) * 1.02
        original(bucket, query, key, value, scale, *rest)

    monkeypatch.setattr(seq2seq_attention, "_encoder_attention", broken)


BREAKS = {"cross": _cross_values_one_percent_off, "encoder": _encoder_scale_two_percent_off}


@pytest.mark.parametrize("arch", ["marian", "bart", "t5", "m2m100"])
def test_the_paged_families_pass_deterministically_in_well_under_a_second(arch: str) -> None:
    engine = Seq2SeqEngine(build_pair(arch, sharp=True).model, CONFIG, num_blocks=256)
    first, second = self_check(engine), self_check(engine)
    assert first.passed and second.passed, first.reason
    assert first.max_logit_error == second.max_logit_error, "deterministic"
    assert first.seconds < 1.0
    assert engine.stats().num_steps == 0 and engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


@pytest.mark.parametrize("arch", ["marian", "mt5"])  # mT5's test model: T5's (init x4) saturates every score
@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_slightly_wrong_attention_path_fails_the_check(arch: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Seq2SeqEngine(build_pair(arch, sharp=True).model, CONFIG, num_blocks=256)
    BREAKS[name](monkeypatch)
    verdict = self_check(engine)
    assert not verdict.passed
    assert "paged" in verdict.reason


def test_a_model_failing_the_check_is_served_by_generate_and_says_so(
    demo_models: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The demo translator (Marian) with cross-attention values 1% off: one log line, the model as loaded,
    `stats()` naming the path and the reason, and translations equal to `generate`."""
    lm = load_demo(demo_models, "demo-translator")
    reference = copy.deepcopy(lm.model)
    _cross_values_one_percent_off(monkeypatch)
    with caplog.at_level(logging.INFO, logger="pagedq.worker.engine.tasks.translate"):
        executor = Seq2SeqExecutor(lm, EngineConfig())
    lines = [r for r in caplog.records if r.name == "pagedq.worker.engine.tasks.translate"]
    assert len(lines) == 1 and "self-check" in lines[0].getMessage(), [r.getMessage() for r in lines]
    stats = executor.stats().as_dict()
    assert executor.engine is None and stats["path"] == "generate"
    assert stats["path_reason"].startswith("self-check failed: ")
    assert lm.model.config._attn_implementation != ATTENTION_NAME, "the model is given back as loaded"
    reqs = [
        request(TaskType.TRANSLATE, TranslateRequest(text=t, generation=GenerationOptions()), "demo-translator")
        for t in TEXTS[:3]
    ]
    run(executor, reqs)
    for req, text in zip(reqs, TEXTS, strict=False):
        inputs = lm.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            want = reference.generate(**inputs)[0, 1:].tolist()
        while want and want[-1] == lm.tokenizer.pad_token_id:
            want.pop()
        assert req.future.result(timeout=0).translation == lm.tokenizer.decode(want, skip_special_tokens=True)


def test_the_demo_translator_passes_and_says_so(demo_models: Path) -> None:
    executor = Seq2SeqExecutor(load_demo(demo_models, "demo-translator"), EngineConfig())
    assert executor.stats().as_dict()["path"] == "paged"
    assert executor.stats().as_dict()["path_reason"].startswith("self-check passed (")
