"""The native bf16 attention within segments (worker/engine/cpu/native/varlen_attention.c) against exact attention
and against torch's own bf16 SDPA.

Inputs attend sharply (q and k scaled so scores reach tens: tiny random inputs attend almost uniformly and hide
errors). Measured on the development machine (2026-12-04, AMD EPYC with AVX512-BF16, torch 2.13): against an
fp64 attention of the same bf16 inputs, the kernel's max error is 2^-8.1..2^-9.0 of max |output| (mean 8.5e-4
on unit values), the same as torch's bf16 SDPA per segment, and 99.9% of its outputs equal SDPA's bit for bit
(the rest differ in the last bits of values near zero). Asserted: within 2^-7 of max |output| of exact (as for
the SDPA path, tests/worker/engine/encoder/test_encoder_bf16.py), and at least 99% of outputs equal to SDPA's.
The kernel needs AVX512-BF16: on a CPU without it `available()` is False and the packed classifier keeps SDPA,
which the last test checks either way.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

import pagedq.worker.engine.cpu.varlen_bf16 as native
from pagedq.worker.engine.cpu.native import c_compiler
from pagedq.worker.engine.encoder.varlen_attention import Segments, varlen_attention

TOLERANCE = 2**-7
LENGTHS = [1, 2, 15, 16, 17, 31, 33, 120, 200, 256, 300]


def _cpu_has_bf16_dot() -> bool:
    try:
        return bool(torch.cpu.get_capabilities().get("avx512_bf16"))
    except (AttributeError, RuntimeError):
        return False


needs_kernel = pytest.mark.skipif(not native.available(), reason="the CPU has no AVX512-BF16 (or no C compiler)")
#: the kernel's two paths: VDPBF16PS (every AVX512-BF16 CPU) and AMX tiles (where the CPU and Linux allow them)
PATHS = [
    pytest.param(False, id="avx512bf16"),
    pytest.param(True, id="amx", marks=pytest.mark.skipif(not native.amx_available(), reason="no AMX-BF16 here")),
]


def test_the_kernel_is_built_wherever_the_cpu_has_bf16_dot_products() -> None:
    """Not a silent fallback: on an AVX512-BF16 CPU with a compiler the kernel must load, and its AMX path on a
    CPU with AMX-BF16 tiles (Linux grants them to any process that asks)."""
    flags = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    amx_cpu = bool(flags.get("amx_bf16")) and os.environ.get("PAGEDQ_AMX") != "0"
    if os.environ.get("PAGEDQ_NATIVE_MARCH", "native") != "native":  # a chosen target: at most what the CPU has
        assert not native.available() or _cpu_has_bf16_dot()
        assert not native.amx_available() or amx_cpu
        return
    expected = _cpu_has_bf16_dot() and c_compiler() is not None
    assert native.available() is expected
    assert native.amx_available() is (amx_cpu and expected)


def packed(tokens: int, heads: int, head_dim: int, sharp: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v as transformers hands them to attention: [1, H, T, D] bf16 views of [1, T, H * D] projections."""
    torch.manual_seed(seed)
    views = []
    for scale in (sharp, sharp, 1.0):
        flat = (torch.randn(1, tokens, heads * head_dim) * scale).to(torch.bfloat16)
        views.append(flat.view(1, tokens, heads, head_dim).transpose(1, 2))
    return tuple(views)


def per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float,
                causal: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch's SDPA of each segment to itself (causal: to its keys up to each query's position), computed in
    `dtype` (default: the inputs'): [T, H, D]."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[0, :, start : start + n].to(dtype or t.dtype) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, is_causal=causal, enable_gqa=True)
        out.append(o.transpose(0, 1))
        start += n
    return torch.cat(out)


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float,
          causal: bool = False) -> torch.Tensor:
    """fp64 attention of each segment to itself: [T, H, D]."""
    return per_segment(q, k, v, lengths, scale, causal, torch.float64)


def bounds(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return Segments.from_lengths(lengths).bounds


@needs_kernel
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize(("heads", "head_dim"), [(12, 64), (2, 16), (3, 32), (1, 128), (2, 256), (4, 48)])
def test_each_segment_attends_to_itself_within_bf16_rounding(heads: int, head_dim: int, amx: bool) -> None:
    """Both paths (AMX where the head dim is a multiple of 32; `amx=None` picks it there by itself)."""
    if amx and head_dim % 32:
        with pytest.raises(RuntimeError, match="status 2"):
            native.varlen_attention_bf16(*packed(4, heads, head_dim), *bounds([4]), 0.5, amx=True)
        return
    lengths = LENGTHS if head_dim <= 64 else [1, 17, 200, 33]
    q, k, v = packed(sum(lengths), heads, head_dim)
    scale = head_dim**-0.5
    got = native.varlen_attention_bf16(q, k, v, *bounds(lengths), scale, amx=amx)
    assert got.dtype == torch.bfloat16 and got.shape == (sum(lengths), heads, head_dim) and got.is_contiguous()
    reference = exact(q, k, v, lengths, scale)
    scores = (q[0, :, -lengths[-1] :].double() @ k[0, :, -lengths[-1] :].double().transpose(-1, -2)) * scale
    assert scores.abs().max() > 10  # sharp attention
    error = float((got.double() - reference).abs().max())
    assert error <= TOLERANCE * float(reference.abs().max()), error
    assert float((got.double() - reference).abs().mean()) < 2e-3
    one = reference[0]  # a segment of one token attends to itself alone: its value, rounded
    assert torch.equal(got[0], one.to(torch.bfloat16))
    assert float((got == per_segment(q, k, v, lengths, scale)).float().mean()) >= 0.99
    default = native.varlen_attention_bf16(q, k, v, *bounds(lengths), scale)  # AMX where it applies
    picked = native.amx_available() and head_dim % 32 == 0
    assert torch.equal(default, native.varlen_attention_bf16(q, k, v, *bounds(lengths), scale, amx=picked))


@needs_kernel
@pytest.mark.parametrize("amx", PATHS)
def test_the_paths_agree_to_fp32_rounding(amx: bool) -> None:
    """The AMX path sums in another order than the VDPBF16PS one: 99% of outputs equal, the rest at most one
    bf16 step of the largest output apart (values near zero, where fp32 sums cancel)."""
    lengths = LENGTHS
    q, k, v = packed(sum(lengths), 4, 64, seed=7)
    one = native.varlen_attention_bf16(q, k, v, *bounds(lengths), 0.125, amx=False)
    other = native.varlen_attention_bf16(q, k, v, *bounds(lengths), 0.125, amx=amx)
    assert float((one.float() - other.float()).abs().max()) <= 2**-7 * float(one.float().abs().max())
    assert float((one == other).float().mean()) >= 0.99


@needs_kernel
def test_rows_of_a_fused_projection_are_read_through_their_strides() -> None:
    """q, k, v as slices of one [T, 3 * H * D] projection (token stride 3 * H * D): the same result."""
    lengths, heads, head_dim = [40, 7, 129], 4, 64
    tokens, width = sum(lengths), heads * head_dim
    torch.manual_seed(1)
    fused = (torch.randn(tokens, 3 * width) * 2).to(torch.bfloat16)
    q, k, v = (fused[:, i * width : (i + 1) * width].view(1, tokens, heads, head_dim).transpose(1, 2)
               for i in range(3))  # fmt: skip
    assert native.usable(q, k, v) and q.stride(2) == 3 * width
    got = native.varlen_attention_bf16(q, k, v, *bounds(lengths), 0.125)
    contiguous = tuple(t.contiguous().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert torch.equal(got, native.varlen_attention_bf16(*contiguous, *bounds(lengths), 0.125))


def test_usable_only_for_what_the_kernel_reads() -> None:
    q, k, v = packed(10, 2, 64)
    assert not native.usable(q.float(), k.float(), v.float())  # fp32 stays on SDPA
    q24, k24, v24 = packed(10, 2, 24)
    assert not native.usable(q24, k24, v24)  # head dim not a multiple of 16
    q3, k3, v3 = packed(10, 3, 64)
    assert not native.usable(q3, k, v)  # 3 query heads cannot share 2 key/value heads
    assert not native.usable(q, k, v[:, :, :9])  # keys and values of other lengths than the queries
    wide = torch.zeros(1, 2, 10, 128, dtype=torch.bfloat16)[..., ::2]  # D not of unit stride
    assert wide.shape == q.shape and not native.usable(wide, k, v)
    if native.available():  # q in a layout of its own (contiguous [1, H, T, D]): read through its strides
        q_copy = q.contiguous()
        assert native.usable(q_copy, k, v)
        args = (*bounds([3, 7]), 0.125)
        own = native.varlen_attention_bf16(q_copy, k, v, *args)
        assert torch.equal(own, native.varlen_attention_bf16(q, k, v, *args))
    assert native.usable(q, k, v) is native.available()


def test_packed_bf16_attention_takes_the_kernel_where_it_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed classifier's attention (encoder/varlen_attention.py) calls the kernel for bf16 on an
    AVX512-BF16 CPU and SDPA per group elsewhere; both within the same tolerance of exact attention."""
    calls = []
    kernel = native.varlen_attention_bf16
    monkeypatch.setattr(native, "varlen_attention_bf16", lambda *a: calls.append(1) or kernel(*a))
    rng = random.Random(3)
    lengths = [rng.randint(1, 160) for _ in range(12)]
    q, k, v = packed(sum(lengths), 2, 64, seed=3)
    got = varlen_attention(torch.nn.Module(), q, k, v, None, scaling=0.125,
                           pagedq_segments=Segments.from_lengths(lengths))[0][0]  # fmt: skip
    assert len(calls) == (1 if native.available() else 0)
    reference = exact(q, k, v, lengths, 0.125)
    assert float((got.double() - reference).abs().max()) <= TOLERANCE * float(reference.abs().max())
    q32, k32, v32 = (t.float() for t in (q, k, v))
    varlen_attention(torch.nn.Module(), q32, k32, v32, None, scaling=0.125,
                     pagedq_segments=Segments.from_lengths(lengths))  # fmt: skip
    assert len(calls) == (1 if native.available() else 0)  # fp32 never


@needs_kernel
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 4), (4, 1), (2, 2)])
def test_causal_segments_with_grouped_query_heads(heads: int, kv_heads: int, amx: bool) -> None:
    """A decoder's fresh prompts (`decoder_only/attention.py`): each token sees its segment's keys up to its
    own position; query head h reads kv head h // (heads / kv_heads). K and V come from their own projection
    (another token stride than q's)."""
    lengths, head_dim = [1, 9, 16, 17, 40, 130], 64
    tokens = sum(lengths)
    torch.manual_seed(5)
    q = (torch.randn(1, tokens, heads * head_dim) * 3).to(torch.bfloat16).view(1, tokens, heads, head_dim)
    k = (torch.randn(1, tokens, kv_heads * head_dim) * 3).to(torch.bfloat16).view(1, tokens, kv_heads, head_dim)
    v = torch.randn(1, tokens, kv_heads * head_dim).to(torch.bfloat16).view(1, tokens, kv_heads, head_dim)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    assert native.usable(q, k, v)
    got = native.varlen_attention_bf16(q, k, v, *bounds(lengths), 0.125, causal=True, amx=amx)
    reference = exact(q, k, v, lengths, 0.125, causal=True)
    assert float((got.double() - reference).abs().max()) <= TOLERANCE * float(reference.abs().max())
    first = Segments.from_lengths(lengths).starts  # a segment's first token sees only itself: its value
    for start in first:
        assert torch.equal(got[start], reference[start].to(torch.bfloat16))
    assert float((got == per_segment(q, k, v, lengths, 0.125, causal=True)).float().mean()) >= 0.99
    not_causal = native.varlen_attention_bf16(q, k, v, *bounds(lengths), 0.125, amx=amx)
    assert not torch.equal(not_causal, got)  # the flag matters
