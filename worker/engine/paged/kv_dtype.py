"""What the KV pages store: the model's dtype, or bfloat16 for an fp32 or int8 model (`kv_cache_dtype`).

A decode step reads every running row's K/V from the pool, and on a CPU that read is memory-bound: W4's Marian
reads ~2.5 MB of fp32 K/V per row and step (self and cross, six layers), and the native kernel spends about a
quarter of an int8 greedy step on it. Stored in bfloat16, the pool is half the bytes to read (and twice the
requests in the same memory), while the weights and every other activation keep the model's precision:
vLLM's `kv_cache_dtype` (fp8 there) and transformers' quantized caches make the same trade.

It changes results, so it is the model's registry entry's choice (`kv_cache_dtype: bfloat16`), never a default,
and it is defined exactly: the engine computes the model as if its cache rounded every K/V it stores to
bfloat16 (round to nearest even) and attention read them back (`paged.pages`). `RoundingCache` is that cache
for transformers' own forward and `generate`: the load-time self-checks compare the engine against the model
run with it, at the model dtype's own tolerance, and the tests require `generate` with it token for token.
How far that is from the fp32 model is measured and stated (README, bench/precision.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache

#: registry / EngineConfig names -> the storage dtype (None: the model's own)
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bfloat16": torch.bfloat16}
#: model dtypes a bfloat16 pool may serve (an int8 model computes in fp32)
_NARROWS = (torch.float32, torch.bfloat16)


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pages' dtype for `kv_cache_dtype=name` on a model computing in `model_dtype`; ValueError for an
    unknown name or a pair that would not narrow (bfloat16 K/V for an fp16 model loses mantissa bits, not only
    memory: refused)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not one of {sorted(KV_CACHE_DTYPES)}")
    stored = KV_CACHE_DTYPES[name]
    if stored is None or stored == model_dtype:
        return model_dtype
    if model_dtype not in _NARROWS:
        raise ValueError(f"kv_cache_dtype {name!r} applies to fp32, int8 and bf16 models, not {model_dtype}")
    return stored


class RoundingCache(DynamicCache):
    """transformers' `DynamicCache`, storing (and returning) every K/V rounded to `stored_dtype` and widened
    back: the reference of an engine whose pages store that dtype (module docstring)."""

    def __init__(self, stored_dtype: torch.dtype, config: Any = None) -> None:
        super().__init__(config=config)
        self.stored_dtype = stored_dtype

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key_states = key_states.to(self.stored_dtype).to(key_states.dtype)
        value_states = value_states.to(self.stored_dtype).to(value_states.dtype)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def reference_cache(model: Any, pages: Any) -> DynamicCache | EncoderDecoderCache | None:
    """What the model's own forward needs to compute what an engine over `pages` (`paged.pages.KVPages`)
    computes: a `rounding_cache` where the pages store a narrower dtype than the model's, else None (no cache)."""
    return rounding_cache(model, pages.pages.dtype) if pages.rounds else None


def rounding_cache(model: Any, stored_dtype: torch.dtype) -> DynamicCache | EncoderDecoderCache:
    """A fresh `RoundingCache` for one forward or `generate` of `model` (an encoder-decoder's self- and
    cross-attention caches both round). Pass it as `cache=` (transformers 5's name; `past_key_values` is
    deprecated), with `use_cache=True`."""
    if getattr(model.config, "is_encoder_decoder", False):
        return EncoderDecoderCache(RoundingCache(stored_dtype), RoundingCache(stored_dtype))
    return RoundingCache(stored_dtype, config=model.config)
