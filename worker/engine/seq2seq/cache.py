"""An `EncoderDecoderCache` whose storage is the paged KV pool.

Encoder-decoder layers in transformers 5.x branch on `isinstance(cache, EncoderDecoderCache)` and on
`cache.is_updated[layer]` (handbook fact 5):

- self-attention always calls `cache.self_attention_cache.update(k, v, layer)`: we write the decoder
  rows' K/V into their slots (`Seq2SeqMetadata.self_slots`);
- cross-attention with `is_updated[layer] == False` projects `encoder_hidden_states` (the encoder output of
  the requests whose encoder ran in this step) and calls `cross_attention_cache.update(k, v, layer)`: we
  write them into those requests' cross pages (`Seq2SeqMetadata.cross_slots`); with `is_updated` True it
  skips the projection and reads `cross_attention_cache.layers[layer].keys/.values`: placeholders of one
  key, never attended to. The runner sets `is_updated` before each pass (`project_cross`); the attention
  function reads every request's cross K/V from its pages (`seq2seq.attention`).

`get_seq_length()` is 0: positions come from the engine (`seq2seq.model`), never from the cache.
The writers find the slots in the step's metadata, passed down in the layers' `kwargs` (recent transformers 5.x
hand them to `update`), else in `step_metadata`, which the runner sets for the length of each pass (earlier 5.x
releases call `update(k, v, layer)` without them).
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


class _PagedWriter:
    """Writes one pass's new K/V ([1, H, N, D]) into the pool at the slots the metadata names (`slots`:
    `self_slots` for decoder rows, `cross_slots` for the rows of newly encoded requests)."""

    def __init__(self, pool: KVPool, num_layers: int, slots: str) -> None:
        self.pool, self.slots = pool, slots
        self.layers = [_PlaceholderLayer(pool.num_heads, pool.head_dim, pool.compute_dtype, pool.device)] * num_layers
        self.step_metadata: Seq2SeqMetadata | None = None  # the pass's metadata (`PagedEncoderDecoderCache`)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        meta: Seq2SeqMetadata | None = (kwargs or {}).get(METADATA_KWARG) or self.step_metadata
        assert meta is not None, "a paged pass without its metadata (in the layers' kwargs or step_metadata)"
        slots = getattr(meta, self.slots)
        assert slots is not None and slots[0].shape[0] == key_states.shape[2], f"K/V rows do not match {self.slots}"
        self.pool.write(layer_idx, slots, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states  # unrounded: `_segment_attention` rounds what it reads (KVPages.stored)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class PagedEncoderDecoderCache(EncoderDecoderCache):
    """Self- and cross-attention K/V of every running request, in one block pool (module docstring)."""

    def __init__(self, pool: KVPool, num_layers: int) -> None:  # no super().__init__: no dynamic layers
        self.pool = pool
        self.num_layers = num_layers
        self.self_attention_cache: Any = _PagedWriter(pool, num_layers, "self_slots")
        self.cross_attention_cache: Any = _PagedWriter(pool, num_layers, "cross_slots")
        self.is_updated = dict.fromkeys(range(num_layers), True)

    @property
    def step_metadata(self) -> Seq2SeqMetadata | None:
        return self.self_attention_cache.step_metadata  # type: ignore[no-any-return]

    @step_metadata.setter
    def step_metadata(self, meta: Seq2SeqMetadata | None) -> None:
        """Set by the runner for the length of each pass, None between passes (module docstring)."""
        self.self_attention_cache.step_metadata = self.cross_attention_cache.step_metadata = meta

    def project_cross(self, new_requests: bool) -> None:
        """Before a pass: its cross-attention projects `encoder_hidden_states` (the encoder output of the
        requests whose encoder ran in this step) into their pages, or reads the placeholders."""
        self.is_updated = dict.fromkeys(range(self.num_layers), not new_requests)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return f"PagedEncoderDecoderCache(layers={self.num_layers}, blocks={self.pool.num_blocks})"
