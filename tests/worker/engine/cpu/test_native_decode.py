"""The native paged decode kernel (worker/engine/cpu/native) against dense attention in torch: scattered
block tables of different lengths, grouped-query heads, sliding windows, log-sum-exp; and loading it
leaves the process's float behaviour alone."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from pagedq.worker.engine.cpu.native import c_compiler, paged_decode, paged_decode_available

# Skipped only where nothing can build the kernel; with a compiler, a kernel that fails to build fails here.
pytestmark = pytest.mark.skipif(
    c_compiler() is None or os.environ.get("PAGEDQ_NATIVE") == "0", reason="no C compiler, or PAGEDQ_NATIVE=0"
)


def test_the_kernel_builds_and_loads() -> None:
    assert paged_decode_available(), "a C compiler is on PATH but the kernel did not build (see the log)"


def _case(heads: int, kv_heads: int, lens: list[int], block_size: int = 4, dim: int = 24, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    k = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    v = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, as after churn in the pool
    tables, flat, starts = [], [], []
    for n in lens:
        table = [order.pop() for _ in range(-(-n // block_size))]
        starts.append(len(flat))
        flat.extend(table + [0, 0])  # padding after each table is never read
        tables.append(table)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    return q, k, v, tables, torch.tensor(flat), torch.tensor(starts), torch.tensor(lens)


def _dense(q, k, v, tables, lens, scale, window):  # type: ignore[no-untyped-def]
    outs, lses = [], []
    for r, (table, n) in enumerate(zip(tables, lens.tolist(), strict=True)):
        keys = k[table].flatten(0, 1)[:n].transpose(0, 1)  # [KVH, n, D]
        vals = v[table].flatten(0, 1)[:n].transpose(0, 1)
        lo = max(0, n - window) if window else 0
        mask = torch.arange(n) >= lo
        group = q.shape[1] // k.shape[2]
        keys, vals = keys.repeat_interleave(group, 0), vals.repeat_interleave(group, 0)
        scores = (q[r, :, None] @ keys.transpose(1, 2))[:, 0] * scale  # [H, n]
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(F.softmax(scores, -1)[:, None] @ vals)
        lses.append(torch.logsumexp(scores, -1))
    return torch.stack(outs)[:, :, 0], torch.stack(lses)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_matches_dense_attention(heads: int, kv_heads: int, window: int | None) -> None:
    q, k, v, tables, flat, starts, lens = _case(heads, kv_heads, [1, 7, 16, 33, 4, 21])
    out, lse = paged_decode(q, k, v, flat, starts, lens, 0.3, window)
    want, want_lse = _dense(q, k, v, tables, lens, 0.3, window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(16, 2, 32), (8, 1, 64), (24, 3, 48)])
def test_groups_of_eight_heads_on_one_kv_head(heads: int, kv_heads: int, dim: int) -> None:
    """The path for 8 query heads per kv head (keys and values loaded once for the 8)."""
    q, k, v, tables, flat, starts, lens = _case(heads, kv_heads, [1, 9, 30, 64], dim=dim, seed=1)
    out, lse = paged_decode(q, k, v, flat, starts, lens, 0.2, None)
    want, want_lse = _dense(q, k, v, tables, lens, 0.2, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_blocks_inside_larger_pages_and_one_tensor_for_keys_and_values() -> None:
    """The seq2seq pool: blocks are slices of larger pages (a block stride), and cross-attention reads
    encoder rows as both keys and values (one kv head, 8 query heads, width 512)."""
    q, k, _, tables, flat, starts, lens = _case(8, 1, [5, 40, 17, 1], block_size=16, dim=512)
    pages = torch.randn(k.shape[0], 3, *k.shape[1:])  # each block is one third of a page
    pages[:, 1] = k
    rows = pages[:, 1]
    out, lse = paged_decode(q, rows, rows, flat, starts, lens, 0.05, None)
    want, want_lse = _dense(q, k, k, tables, lens, 0.05, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_a_row_with_nothing_visible_gives_zeros_and_minus_infinity() -> None:
    q, k, v, _, flat, starts, lens = _case(2, 1, [0, 3])
    out, lse = paged_decode(q, k, v, flat, starts, lens, 1.0, None)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1]).all()


def test_rejects_tensors_it_cannot_read() -> None:
    q, k, v, _, flat, starts, lens = _case(2, 1, [3])
    with pytest.raises(ValueError, match="contiguous CPU"):
        paged_decode(q.double(), k, v, flat, starts, lens, 1.0, None)
    with pytest.raises(ValueError, match="contiguous CPU"):
        paged_decode(q, k.transpose(0, 1), v, flat, starts, lens, 1.0, None)


def test_loading_the_kernel_keeps_subnormal_floats() -> None:
    """Built with -ffast-math but linked without it: no flush-to-zero for the whole process."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0
