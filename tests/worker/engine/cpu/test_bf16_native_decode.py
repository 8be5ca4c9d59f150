"""The native paged decode kernel on bf16 blocks (worker/engine/cpu/native): against attention in float64 on the
same bf16 values, with grouped-query heads of every grouping the kernel tiles differently, sliding windows,
soft-capping, blocks inside larger pages (the seq2seq pool) and keys that are the values; bit for bit the
fp32 kernel on the upcast values; bf16 outputs rounded as torch rounds; the AVX2 and plain-C builds too.
And the native greedy argmax (fp32 and bf16 rows) against torch's.

Tolerances (float64 reference on the bf16 inputs): an fp32 output within 2e-6 (absolute, outputs are O(1));
measured 2.4e-7 (AVX-512, this machine). A bf16 output within one bf16 rounding of the reference:
|out - ref| <= 2^-8 |ref| + 1e-6 (measured: every element within half an ulp plus 1e-6, i.e. the fp32 result
rounded once). lse within 2e-6 absolute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pagedq.worker.engine.cpu.native import argmax_rows, c_compiler, paged_decode, paged_decode_available

pytestmark = pytest.mark.skipif(
    c_compiler() is None or os.environ.get("PAGEDQ_NATIVE") == "0", reason="no C compiler, or PAGEDQ_NATIVE=0"
)
OUT_TOL = 2e-6
LSE_TOL = 2e-6


def _case(heads: int, kv_heads: int, lens: list[int], block_size: int, dim: int, seed: int, pages: int = 1) -> tuple:
    """bf16 q and caches (the caches one slice of `pages`-times larger pages when pages > 1), scattered tables."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    store = torch.randn(num_blocks, pages, 2, block_size, kv_heads, dim, generator=gen).bfloat16()
    k, v = store[:, pages - 1, 0], store[:, pages - 1, 1]  # blocks pages * 2 * block elements apart
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, flat, starts = [], [], []
    for n in lens:
        table = [order.pop() for _ in range(-(-n // block_size))]
        starts.append(len(flat))
        flat.extend(table + [0])  # padding after each table is never read
        tables.append(table)
    q = (torch.randn(len(lens), heads, dim, generator=gen) * 2).bfloat16()
    return q, k, v, tables, torch.tensor(flat), torch.tensor(starts), torch.tensor(lens)


def _reference(q, k, v, tables, lens, scale, window, softcap):  # type: ignore[no-untyped-def]
    """Attention in float64 on the same (bf16) values: out [rows, H, D], lse [rows, H]."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[2]
    outs, lses = [], []
    for r, (table, n) in enumerate(zip(tables, lens.tolist(), strict=True)):
        keys = k[table].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(group, 0)  # [H, n, D]
        vals = v[table].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(group, 0)
        s = (keys @ q[r, :, :, None])[..., 0] * scale  # [H, n]
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if window:
            s[:, : max(0, n - window)] = float("-inf")
        outs.append((torch.softmax(s, -1)[:, None] @ vals)[:, 0])
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs), torch.stack(lses)


SHAPES = [  # heads, kv_heads, dim: every score grouping (8 or 4 heads per tile, 1..8 per kv head), odd ones
    (8, 4, 64), (8, 8, 64), (8, 1, 64), (16, 2, 128), (32, 8, 64), (12, 4, 64), (4, 2, 16), (6, 3, 48),
    (24, 8, 80), (4, 4, 20), (8, 2, 40), (2, 1, 256),
]  # fmt: skip


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (7, None), (None, 20.0)])
def test_bf16_blocks_match_float64_attention(
    heads: int, kv_heads: int, dim: int, window: int | None, softcap: float | None
) -> None:
    assert paged_decode_available()
    lens = [1, 5, 16, 17, 40, 3, 64]
    q, k, v, tables, flat, starts, lens_t = _case(heads, kv_heads, lens, 16, dim, seed=heads * dim)
    scale = dim**-0.5
    want, want_lse = _reference(q, k, v, tables, lens_t, scale, window, softcap)
    out, lse = paged_decode(q, k, v, flat, starts, lens_t, scale, window, softcap, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=0, atol=OUT_TOL)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=LSE_TOL)
    out16, lse16 = paged_decode(q, k, v, flat, starts, lens_t, scale, window, softcap)  # out in q's dtype
    assert out16.dtype == torch.bfloat16 and torch.equal(lse16, lse)
    assert ((out16.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
def test_bf16_blocks_give_exactly_the_fp32_kernel_on_the_upcast_values(heads: int, kv_heads: int, dim: int) -> None:
    """bf16 is widened exactly and every later step is the fp32 path's: the same bits, and a bf16 output is
    the fp32 output rounded (to nearest even, as torch's `.bfloat16()`)."""
    q, k, v, _, flat, starts, lens = _case(heads, kv_heads, [2, 30, 9, 48], 8, dim, seed=dim)
    out32, lse32 = paged_decode(q.float(), k.float(), v.float(), flat, starts, lens, 0.2, 6, 25.0)
    out, lse = paged_decode(q, k, v, flat, starts, lens, 0.2, 6, 25.0, out_dtype=torch.float32)
    assert torch.equal(out, out32) and torch.equal(lse, lse32)
    out16, _ = paged_decode(q, k, v, flat, starts, lens, 0.2, 6, 25.0)
    assert torch.equal(out16, out32.bfloat16())
    mixed, _ = paged_decode(q.float(), k, v, flat, starts, lens, 0.2, 6, 25.0, out_dtype=torch.bfloat16)
    assert torch.equal(mixed, out16)  # an fp32 query of the same values: the same answer


def test_blocks_inside_larger_pages_and_one_tensor_for_keys_and_values() -> None:
    """The seq2seq pool in bf16: blocks are slices of larger pages (a block stride beyond the block), and
    cross-attention reads encoder rows as keys and values (one kv head, 8 query heads, width 512)."""
    q, k, _, tables, flat, starts, lens = _case(8, 1, [5, 40, 17, 1, 33], 16, 512, seed=3, pages=3)
    assert k.stride(0) > k[0].numel()
    want, want_lse = _reference(q, k, k, tables, lens, 0.05, None, None)
    out, lse = paged_decode(q, k, k, flat, starts, lens, 0.05, None, out_dtype=torch.float32)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=OUT_TOL)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=LSE_TOL)
    q2, k2, v2, tables2, flat2, starts2, lens2 = _case(8, 4, [9, 31], 4, 64, seed=4, pages=2)  # self blocks
    want2, _ = _reference(q2, k2, v2, tables2, lens2, 0.125, None, None)
    out2, _ = paged_decode(q2, k2, v2, flat2, starts2, lens2, 0.125, None, out_dtype=torch.float32)
    torch.testing.assert_close(out2.double(), want2, rtol=0, atol=OUT_TOL)


def test_a_row_with_nothing_visible_gives_zeros_and_minus_infinity_in_bf16() -> None:
    q, k, v, _, flat, starts, _ = _case(8, 4, [3, 3], 4, 64, seed=5)
    out, lse = paged_decode(q, k, v, flat, starts, torch.tensor([0, 3]), 1.0, None)
    assert out.dtype == torch.bfloat16 and torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_rejects_what_it_cannot_read() -> None:
    q, k, v, _, flat, starts, lens = _case(4, 2, [3], 4, 16, seed=6)
    with pytest.raises(ValueError, match="contiguous CPU"):
        paged_decode(q.half(), k, v, flat, starts, lens, 1.0, None)
    with pytest.raises(ValueError, match="contiguous CPU"):
        paged_decode(q, k, v.float(), flat, starts, lens, 1.0, None)  # K and V of two dtypes
    with pytest.raises(ValueError, match="writes fp32 or bf16"):
        paged_decode(q, k, v, flat, starts, lens, 1.0, None, out_dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_torchs_argmax(dtype: torch.dtype) -> None:
    """The greedy pick: the first maximum (ties to the lowest index), the first NaN if any, 0 for -inf rows."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(9, 32000, generator=gen) * 3).to(dtype)
    x[1, 100] = x[1, 31999] = x[1].max() + 1  # a tie: the first
    x[2, 5000], x[2, 7000] = float("nan"), float("nan")
    x[3] = float("-inf")
    x[4, 31998] = 1e4  # in the last, partial vector
    x[5].zero_()
    x[5, 17] = -0.0
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    for n in (1, 7, 17, 33):  # shorter than a vector, and tails
        assert torch.equal(argmax_rows(x[:, :n]), x[:, :n].argmax(dim=-1)), n
    assert torch.equal(argmax_rows(x[::2]), x[::2].argmax(dim=-1))  # rows apart by a stride
    assert torch.equal(argmax_rows(x.half()), x.half().argmax(dim=-1))  # other dtypes: torch's own


_BUILD_CHECK = textwrap.dedent(
    """
    import torch
    from pagedq.worker.engine.cpu.native import argmax_rows, paged_decode, paged_decode_available
    assert paged_decode_available()
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, dim in [(8, 4, 64), (8, 1, 64), (6, 3, 48), (4, 4, 20), (16, 2, 128)]:
        k = torch.randn(12, 4, kv_heads, dim, generator=g).bfloat16()
        v = torch.randn(12, 4, kv_heads, dim, generator=g).bfloat16()
        q = torch.randn(3, heads, dim, generator=g).bfloat16()
        flat, starts, lens = torch.tensor([3, 7, 1, 0, 5, 9, 2, 11]), torch.tensor([0, 3, 5]), torch.tensor([10, 6, 12])
        o32, l32 = paged_decode(q.float(), k.float(), v.float(), flat, starts, lens, 0.1, 5, 30.0)
        o16, l16 = paged_decode(q, k, v, flat, starts, lens, 0.1, 5, 30.0, out_dtype=torch.float32)
        assert torch.equal(o16, o32) and torch.equal(l16, l32), (heads, kv_heads, dim)
        rows = []
        for r, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
            table = flat[s : s + 3]
            seen = slice(max(0, n - 5), n)
            kk = k.double()[table].flatten(0, 1)[seen].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            vv = v.double()[table].flatten(0, 1)[seen].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            sc = torch.tanh((kk @ q.double()[r, :, :, None])[..., 0] * 0.1 / 30.0) * 30.0
            rows.append((torch.softmax(sc, -1)[:, None] @ vv)[:, 0])
        assert (o16.double() - torch.stack(rows)).abs().max() < 2e-6
    x = torch.randn(5, 1000, generator=g).bfloat16()
    x[2, 10] = float("nan")
    assert torch.equal(argmax_rows(x), x.argmax(-1)) and torch.equal(argmax_rows(x.float()), x.float().argmax(-1))
    print("ok")
    """
)


@pytest.mark.skipif(not os.uname().machine.startswith(("x86_64", "amd64")), reason="x86 targets")
@pytest.mark.parametrize("march", ["haswell", "x86-64"], ids=["avx2", "plain-c"])
def test_the_avx2_and_plain_c_builds(march: str, tmp_path: object) -> None:
    """What an AVX2-only CPU (haswell: no AVX-512) and a CPU without AVX2 (x86-64: the plain C paths) build,
    checked here whatever this CPU has (each in a process of its own: one build per process)."""
    env = {**os.environ, "PAGEDQ_NATIVE_MARCH": march, "PAGEDQ_NATIVE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _BUILD_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
