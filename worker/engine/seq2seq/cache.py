"""An `EncoderDecoderCache` whose storage is the paged KV pool.

Encoder-decoder layers in transformers 5.x branch on `isinstance(cache, EncoderDecoderCache)` and on
`cache.is_updated[layer]` (handbook fact 5):

- self-attention always calls `cache.self_attention_cache.update(k, v, layer)`: we write the decoder
  rows' K/V into their slots (`Seq2SeqMetadata.self_slots`);
- cross-attention with `is_updated[layer] == True` skips the K/V projection of `encoder_hidden_states`
  and reads `cross_attention_cache.layers[layer].keys/.values`: placeholders of one key, never attended
  to. `is_updated` is always True: the attention function reads each request's encoder output from its
  pages and absorbs the layer's K/V projections (`seq2seq.attention`), so no cross K/V are ever made.

`get_seq_length()` is 0: positions come from the engine (`seq2seq.model`), never from the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import EncoderDecoderCache

from pagedq.worker.engine.seq2seq.attention import METADATA_KWARG, KVPool, Seq2SeqMetadata


class _PlaceholderLayer:
    """What cross-attention reads when `is_updated` is True: one dummy key and value."""

    def __init__(self, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.keys = torch.zeros(1, heads, 1, head_dim, dtype=dtype, device=device)
        self.values = self.keys


class _CrossPlaceholders:
    """What cross-attention reads with `is_updated` True; it never projects, so `update` is a bug."""

    def __init__(self, pool: KVPool, num_layers: int) -> None:
        self.pool = pool
        self.layers = [_PlaceholderLayer(pool.num_heads, pool.head_dim, pool.pages.dtype, pool.device)] * num_layers

    def update(self, *_args: Any, **_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("cross-attention projected encoder states; the paged cache expects is_updated=True")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _SelfWriter(_CrossPlaceholders):
    """Writes one pass's new decoder K/V ([1, H, N, D]) into the pool at `Seq2SeqMetadata.self_slots`."""

    def update(  # type: ignore[override]
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        meta: Seq2SeqMetadata = (kwargs or {})[METADATA_KWARG]
        slots = meta.self_slots
        assert slots is not None and slots[0].shape[0] == key_states.shape[2], "K/V rows do not match their slots"
        self.pool.write(layer_idx, slots, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states


class PagedEncoderDecoderCache(EncoderDecoderCache):
    """Self- and cross-attention K/V of every running request, in one block pool (module docstring)."""

    def __init__(self, pool: KVPool, num_layers: int) -> None:  # no super().__init__: no dynamic layers
        self.pool = pool
        self.num_layers = num_layers
        self.self_attention_cache: Any = _SelfWriter(pool, num_layers)
        self.cross_attention_cache: Any = _CrossPlaceholders(pool, num_layers)
        self.is_updated = dict.fromkeys(range(num_layers), True)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return f"PagedEncoderDecoderCache(layers={self.num_layers}, blocks={self.pool.num_blocks})"
