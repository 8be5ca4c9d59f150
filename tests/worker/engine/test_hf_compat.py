"""What the engine does so that the transformers 5.x releases it supports all drive it the same way
(worker/engine/core/hf_compat.py): the cache keyword each model's forward takes, and cache writers that find
the step's slots when a layer calls `update(k, v, layer)` without its kwargs, as earlier 5.x layers do."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from seq2seq_support import build_pair, random_inputs

from pagedq.shared.models import GenerationOptions
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.core.hf_compat import cache_keyword, cache_kwargs
from pagedq.worker.engine.decoder_only.attention import PagedKVCache
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings
from pagedq.worker.engine.seq2seq import cache as seq2seq_cache
from worker.engine.helpers import BUILDERS, TinyModel, random_prompts, run
from worker.engine.seq2seq.test_seq2seq_engine import assert_matches_generate, make_engine
from worker.engine.seq2seq.test_seq2seq_engine import run as run_seq2seq


class _PastKeyValuesForward(torch.nn.Module):
    def forward(self, input_ids: Any = None, past_key_values: Any = None, **kwargs: Any) -> None:
        """An earlier 5.x forward: no `cache` parameter (a `cache=` would fall into **kwargs)."""


class _CacheForward(torch.nn.Module):
    def forward(self, input_ids: Any = None, cache: Any = None, **kwargs: Any) -> None:
        """A recent 5.x forward: `cache`."""


def test_the_cache_keyword_is_the_one_the_forward_takes() -> None:
    assert cache_keyword(_PastKeyValuesForward()) == "past_key_values"
    assert cache_keyword(_CacheForward()) == "cache"
    assert cache_kwargs(_PastKeyValuesForward(), "pages") == {"past_key_values": "pages"}
    for build in (BUILDERS["llama"], lambda: build_pair("marian").model):
        model = build()
        keyword = cache_keyword(model)
        assert keyword in inspect.signature(model.forward).parameters, type(model).__name__


def _drop_kwargs(cls: type, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make `cls.update` see what an earlier 5.x layer passes (no kwargs); count its calls."""
    calls: list[int] = []
    update = cls.update

    def without_kwargs(self: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kw: Any) -> Any:
        calls.append(layer_idx)
        return update(self, key, value, layer_idx)

    monkeypatch.setattr(cls, "update", without_kwargs)
    return calls


def test_decoder_only_layers_that_update_without_kwargs(
    tiny_models: dict[str, TinyModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's `step_metadata` gives `PagedKVCache.update` the slots: greedy still equals `generate`."""
    calls = _drop_kwargs(PagedKVCache, monkeypatch)
    tm = tiny_models["llama"]
    prompts = random_prompts([5, 17, 9], seed=4)
    engine = LLMEngine(tm.model, config=EngineConfig(max_batch_tokens=16, block_size=4), num_blocks=64)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    done = run(engine, {0: [(f"p{i}", p, params) for i, p in enumerate(prompts)]})
    assert calls, "the layers wrote through update()"
    for i, prompt in enumerate(prompts):
        assert done[f"p{i}"].output_token_ids == tm.expected(prompt, 6)
    assert engine.runner.cache.step_metadata is None, "cleared between steps"


@pytest.mark.parametrize("arch", ["marian", "t5"])
def test_seq2seq_layers_that_update_without_kwargs(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's `step_metadata` gives the self- and cross-attention writers the slots."""
    calls = _drop_kwargs(seq2seq_cache._PagedWriter, monkeypatch)
    pair = build_pair(arch)
    inputs = random_inputs(4)
    engine = make_engine(pair.model, native_decode=False)
    outputs = run_seq2seq(engine, inputs, decode_settings(pair.model, GenerationOptions()))
    assert calls
    assert_matches_generate(pair, inputs, outputs)
    assert engine.runner.cache.step_metadata is None, "cleared between passes"
