"""Soft-capping and attention sinks against transformers' own eager formulas, at the kernel level:
the native decode kernel's soft-cap, `attend`'s soft-cap, and `add_sinks` (also after a log-sum-exp merge)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from pagedq.worker.engine.cpu.native import c_compiler, paged_decode
from pagedq.worker.engine.decoder_only.cascade import add_sinks, attend

SOFTCAP = 5.0


def gemma2_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """transformers' Gemma-2 eager attention on [H, Q, D] x [H, L, D] (no mask)."""
    s = q @ k.transpose(-1, -2) * scale
    s = torch.tanh(s / softcap) * softcap
    return F.softmax(s, dim=-1, dtype=torch.float32) @ v


def gpt_oss_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """transformers' GPT-OSS eager attention on [H, Q, D] x [H, L, D] (no mask)."""
    s = q @ k.transpose(-1, -2) * scale
    combined = torch.cat([s, sinks.reshape(-1, 1, 1).expand(-1, s.shape[1], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return F.softmax(combined, dim=-1)[..., :-1] @ v


def sharp_case(seed: int = 0, heads: int = 4, q_len: int = 3, keys: int = 11, dim: int = 8) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, q_len, dim, generator=gen) * 4  # scores of tens: the cap and the sinks matter
    k = torch.randn(heads, keys, dim, generator=gen) * 4
    v = torch.randn(heads, keys, dim, generator=gen)
    return q, k, v


def test_attend_soft_caps_like_gemma2() -> None:
    q, k, v = sharp_case()
    o, _ = attend(q, k, v, None, 0.5, SOFTCAP)
    assert (q @ k.transpose(-1, -2) * 0.5).abs().max() > 4 * SOFTCAP
    torch.testing.assert_close(o, gemma2_eager(q, k, v, 0.5, SOFTCAP), atol=1e-5, rtol=1e-5)


def test_sinks_after_a_split_merge_match_gpt_oss() -> None:
    """Keys in two parts, each with its own log-sum-exp, merged, then the sink: as one softmax with it."""
    q, k, v = sharp_case(seed=1)
    sinks = torch.tensor([0.0, 3.0, -2.0, 40.0])  # the last one takes nearly all the weight
    o1, l1 = attend(q, k[:, :4], v[:, :4], None, 0.5)
    o2, l2 = attend(q, k[:, 4:], v[:, 4:], None, 0.5)
    lse = torch.logaddexp(l1, l2)
    o = o1 * (l1 - lse).exp().unsqueeze(-1) + o2 * (l2 - lse).exp().unsqueeze(-1)
    got = add_sinks(o.transpose(0, 1), lse.transpose(0, 1), sinks).transpose(0, 1)
    torch.testing.assert_close(got, gpt_oss_eager(q, k, v, 0.5, sinks), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(c_compiler() is None or os.environ.get("PAGEDQ_NATIVE") == "0", reason="no native kernel")
def test_native_kernel_soft_caps() -> None:
    heads, kv_heads, dim, bs = 4, 2, 8, 4
    gen = torch.Generator().manual_seed(2)
    lens = [3, 9, 14]
    k_cache = torch.randn(12, bs, kv_heads, dim, generator=gen) * 4
    v_cache = torch.randn(12, bs, kv_heads, dim, generator=gen)
    q = torch.randn(len(lens), heads, dim, generator=gen) * 4
    tables = [[5], [0, 7, 2], [9, 1, 4, 11]]
    flat = torch.tensor([b for t in tables for b in t])
    starts = torch.tensor([0, 1, 4])
    out, _ = paged_decode(q, k_cache, v_cache, flat, starts, torch.tensor(lens), 0.5, None, SOFTCAP)
    for r, (table, n) in enumerate(zip(tables, lens, strict=True)):
        keys = k_cache[table].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(2, 0)  # [H, n, D]
        vals = v_cache[table].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(2, 0)
        want = gemma2_eager(q[r][:, None], keys, vals, 0.5, SOFTCAP)[:, 0]
        torch.testing.assert_close(out[r], want, atol=1e-4, rtol=1e-4)
