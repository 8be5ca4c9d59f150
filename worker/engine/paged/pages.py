"""The page tensors of one model: one page per `BlockPool` block id, for every generative architecture.

    pages: [num_blocks, 2 (K, V), num_layers, block_size, kv_heads, head_dim]

A page holds one block of K and V for every layer (a sequence's blocks, read by paged self-attention and the
native kernel: each block of a layer contiguous, blocks `pages.stride(0)` apart); an encoder-decoder request's
cross-attention K/V take pages of the same layout, `block_size` encoder positions each (`Request.encoder_blocks`).
Copy-on-write copies whole pages, every layer at once. Zeros, not empty: padded rows read unused slots; they
are masked, but 0 * NaN is NaN.
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
    ) -> None:
        shape = (num_blocks, 2, num_layers, block_size, num_kv_heads, head_dim)
        self.pages = torch.zeros(shape, dtype=dtype, device=device)
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
        """Store K/V rows [N, kv_heads, head_dim] of `layer` at (blocks [N], offsets [N])."""
        self.key_cache[layer].index_put_(slots, key)
        self.value_cache[layer].index_put_(slots, value)

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids` [N] as [N * block_size, kv_heads, head_dim]."""
        k = self.key_cache[layer].index_select(0, block_ids)
        v = self.value_cache[layer].index_select(0, block_ids)
        return k.flatten(0, 1), v.flatten(0, 1)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole pages (src -> dst), every layer at once."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.pages[dst] = self.pages[src]
