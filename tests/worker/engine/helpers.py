"""Tiny random-weight decoder-only models (fp32, 2 layers) and helpers to compare with `generate`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pagedq.worker.engine.core.request import RequestOutput
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.sampling import SamplingParams

VOCAB = 512
# No EOS in the configs: generate() and the engine both run to max_new_tokens unless a test says otherwise.
COMMON: dict[str, Any] = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _llama() -> Any:
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **COMMON,
        )
    )


def _qwen2() -> Any:
    # Layer 0 full attention, layer 1 sliding (window 6): per-layer windows.
    return Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,
            **COMMON,
        )
    )


def _mistral() -> Any:
    return MistralForCausalLM(
        MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=256,
            sliding_window=7,
            **COMMON,
        )
    )


def _gpt2() -> Any:
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **COMMON))


BUILDERS: dict[str, Callable[[], Any]] = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gpt2": _gpt2}


@dataclass
class TinyModel:
    """A model for the engine and an independent deep copy (own config) for `generate`."""

    name: str
    model: Any
    reference: Any
    _cache: dict[tuple, list[int]] = field(default_factory=dict)

    def expected(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation from transformers' own `generate` (batch of one: no padding)."""
        key = (tuple(prompt), max_new_tokens)
        if key not in self._cache:
            with torch.no_grad():
                out = self.reference.generate(
                    torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
                )
            self._cache[key] = out[0, len(prompt) :].tolist()
        return self._cache[key]


def build_tiny(name: str, seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    model.generation_config.eos_token_id = None
    return TinyModel(name, model, copy.deepcopy(model))


def random_prompts(lengths: list[int], seed: int = 1, prefix: list[int] | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [(prefix or []) + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def run(
    engine: LLMEngine,
    arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
    aborts: dict[int, list[str]] | None = None,
    max_steps: int = 2000,
) -> dict[str, RequestOutput]:
    """Drive the engine step by step: add requests at given steps, abort others, check KV waste."""
    aborts = aborts or {}
    done: dict[str, RequestOutput] = {}
    bs = engine.config.block_size
    for i in range(max_steps):
        for rid, prompt, params in arrivals.get(i, []):
            engine.add_request(rid, prompt, params)
        for rid in aborts.get(i, []):
            engine.abort_request(rid)
        if i > max(arrivals) and not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        for r in engine.scheduler.running:
            assert 0 <= engine.kv.waste_slots(r.sequence) < bs, "more than one partial block allocated-but-unused"
    raise AssertionError("engine did not finish")


@contextmanager
def recorded_logits(engine: LLMEngine) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Every logits row the engine samples from, per request id, in order (while the block runs)."""
    rows: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def recording(out: Any, block_ids: Any) -> Any:
        logits, samplers = execute(out, block_ids)
        for row, seq in zip(logits, samplers, strict=True):
            rows.setdefault(seq.seq_id, []).append(row.clone())
        return logits, samplers

    engine.runner.execute = recording  # type: ignore[method-assign]
    try:
        yield rows
    finally:
        del engine.runner.execute


def reference_logits(model: Any, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' own forward (the model's default attention, no cache) on one request alone:
    the logits that chose each output token, [len(output), vocab] fp32."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + output[:-1]]), use_cache=False).logits[0]
    return logits[len(prompt) - 1 :].float()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is 5-50x faster than two (no team of
    spinning threads waiting on a descheduled one). Import it into a test module and mark it used."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
