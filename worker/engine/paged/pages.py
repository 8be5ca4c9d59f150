"""The page tensors of one model: one page per `BlockPool` block id, for every generative architecture.

    pages: [num_blocks, 2 (K, V), num_layers, block_size, kv_heads, head_dim]

A page holds one block of K and V for every layer (a sequence's blocks, read by paged self-attention and the
native kernel: each block of a layer contiguous, blocks `pages.stride(0)` apart); an encoder-decoder request's
cross-attention K/V take pages of the same layout, `block_size` encoder positions each (`Request.encoder_blocks`).
Copy-on-write copies whole pages, every layer at once. Zeros, not empty: padded rows read unused slots; they
are masked, but 0 * NaN is NaN.

Storage dtype (`EngineConfig.kv_cache_dtype`): the pages hold K/V in the model's dtype, or in bfloat16 for an
fp32 or int8 model (`kv_cache_dtype="bfloat16"`, as vLLM's `kv_cache_dtype` stores fp8). Every attention read then
sees the stored values: `write` rounds to the storage dtype, `gather` widens back to the model's (`compute_dtype`,
exact), the native kernel widens in registers, and attention over this step's own K/V (a prefill chunk that
reads no pages: decoder-only `_prefill_attention`, seq2seq `_segment_attention`) takes `stored(k)`, `stored(v)`,
the rounded values too (there, not in the caches' `update`: a decode step reads only pages, and rounding its
rows twice more cost ~5% of a W4 greedy step). The engine's output is then exactly the model run with a cache
that rounds what it stores (`paged.kv_dtype.RoundingCache`, the self-checks' and the tests' reference), not an
approximation of something unstated.
"""

from __future__ import annotations

import torch


class KVPages:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: what the pages store; `compute_dtype`: the model's dtype, what attention computes in
        (default: `dtype`)."""
        shape = (num_blocks, 2, num_layers, block_size, num_kv_heads, head_dim)
        self.pages = torch.zeros(shape, dtype=dtype, device=device)
        self.compute_dtype = compute_dtype or dtype
        self.key_cache = self.pages[:, 0].transpose(0, 1)  # [layers, blocks, block_size, kv_heads, head_dim]
        self.value_cache = self.pages[:, 1].transpose(0, 1)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def device(self) -> torch.device:
        return self.pages.device

    @property
    def nbytes(self) -> int:
        return self.pages.nbytes

    def write(
        self, layer: int, slots: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store K/V rows [N, kv_heads, head_dim] of `layer` at (blocks [N], offsets [N]), in the storage dtype
        (round to nearest even, as `Tensor.to`)."""
        dtype = self.pages.dtype
        self.key_cache[layer].index_put_(slots, key.to(dtype))
        self.value_cache[layer].index_put_(slots, value.to(dtype))

    @property
    def dtype_name(self) -> str:
        """What the pages store, as the registry spells dtypes ("float32", "bfloat16"): the stats report it."""
        return str(self.pages.dtype).removeprefix("torch.")

    @property
    def rounds(self) -> bool:
        """Whether the pages store K/V in a narrower dtype than the model computes in."""
        return self.pages.dtype != self.compute_dtype

    def stored(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as attention reads it back from the pages: rounded to the storage dtype and widened again (`x`
        itself when the pages store the model's dtype)."""
        return x.to(self.pages.dtype).to(x.dtype) if self.rounds else x

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids` [N] as [N * block_size, kv_heads, head_dim], in the model's dtype."""
        k = self.key_cache[layer].index_select(0, block_ids)
        v = self.value_cache[layer].index_select(0, block_ids)
        return k.flatten(0, 1).to(self.compute_dtype), v.flatten(0, 1).to(self.compute_dtype)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole pages (src -> dst), every layer at once."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.pages[dst] = self.pages[src]
