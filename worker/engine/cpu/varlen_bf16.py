"""bf16 attention within the segments of a packed row on AVX512-BF16 CPUs (`native/varlen_attention.c`).

The packed classifier's attention (`encoder/varlen_attention.py`) calls torch's SDPA once per group of
similar-length segments. In bf16 on a CPU with AVX512-BF16 but without AMX, that SDPA runs at fp32's speed
(measured on W3's BERT-base groups: 8 x 200 tokens 11.7 ms bf16 against 11.6 ms fp32), so a bf16 step spent
~20% of its time there against ~11% in fp32. The kernel attends each segment to itself at its own length (no
padding, no groups) with the CPU's bf16 dot-product instruction, in the arithmetic of torch's bf16 flash
attention (fp32 scores, softmax and sums; probabilities rounded to bf16 before they weight V).

`varlen_attention_bf16(q, k, v, starts, lengths, scale, causal)` takes q/k/v as transformers hands them to an
attention function, q [1, H, T, D] and k/v [1, KVH, T, D] bf16 views of their projections (grouped-query heads
read their kv head), and returns out [T, H, D] bf16. Callers: the packed classifier (`encoder/
varlen_attention.py`), seq2seq encoder passes (`seq2seq/attention.py`), and, causal, a decoder's fresh prompts
(`decoder_only/attention.py`: chunks with nothing cached before them).
On a CPU with AMX (Sapphire Rapids and later) the same arithmetic runs on AMX tiles (`amx_available()`; head
dims that are multiples of 32; `PAGEDQ_AMX=0` keeps the VDPBF16PS path): on W3's BERT-base shapes (64 texts of
8..256 tokens, 12 heads of 64, 2 threads) 17 ms against 47 (290 against 110 GFLOP/s), and W3's whole bf16 run
50 -> 64 texts/s, the kernel's share of it 39% -> 19% (2026-12-04, a 2-core Xeon with AMX). The two paths sum
in another order: 99.9% of outputs equal, the rest one bf16 step apart at most.
`available()` is False without a compiler, with PAGEDQ_NATIVE=0, or on a CPU whose build lacks AVX512-BF16;
`usable(...)` adds the shape checks; callers keep SDPA otherwise.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from pagedq.worker.engine.cpu.native import load_library

_SOURCE = Path(__file__).with_name("native") / "varlen_attention.c"
MAX_HEAD_DIM = 256


def _configure(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("pagedq_varlen_bf16_supported", "pagedq_varlen_amx_supported"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_int
    fn = lib.pagedq_varlen_attention_bf16
    fn.argtypes = [p, p, p, p, p, p, *[i64] * 8, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int


_supported: bool | None = None
_amx: bool | None = None


def _load() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _configure, "native bf16 varlen attention", "SDPA per group of segments")


def available() -> bool:
    """Whether the kernel is built with AVX512-BF16 for this CPU (builds it on the first call)."""
    global _supported
    if _supported is None:
        lib = _load()
        _supported = lib is not None and bool(lib.pagedq_varlen_bf16_supported())
    return _supported


def amx_available() -> bool:
    """Whether the kernel's AMX path runs here: built for AMX-BF16 tiles, the process allowed to use them by
    Linux, and not turned off with PAGEDQ_AMX=0."""
    global _amx
    if _amx is None:
        lib = _load() if available() else None
        _amx = lib is not None and bool(lib.pagedq_varlen_amx_supported()) and os.environ.get("PAGEDQ_AMX") != "0"
    return _amx


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """The kernel applies: bf16 CPU tensors, query [1, H, T, D] and key/value [1, KVH, T, D] with H a multiple
    of KVH (grouped-query attention), key and value in one layout, unit stride along D and even strides
    otherwise, D a multiple of 16 up to `MAX_HEAD_DIM`; the kernel available."""
    if query.dtype != torch.bfloat16 or query.device.type != "cpu" or query.dim() != 4 or query.shape[0] != 1:
        return False
    _, heads, tokens, head_dim = query.shape
    if head_dim % 16 or head_dim > MAX_HEAD_DIM:
        return False
    kv_shape = key.shape
    if len(kv_shape) != 4 or kv_shape[0] != 1 or kv_shape[2:] != (tokens, head_dim) or heads % max(kv_shape[1], 1):
        return False
    for t in (key, value):
        if t.dtype != query.dtype or t.device.type != "cpu" or t.shape != kv_shape or t.stride() != key.stride():
            return False
    strides = (*query.stride()[1:], *key.stride()[1:])
    return strides[2] == strides[5] == 1 and all(x % 2 == 0 for x in strides[:2] + strides[3:5]) and available()


def varlen_attention_bf16(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
    scale: float, causal: bool = False, amx: bool | None = None,
) -> torch.Tensor:
    """Each segment's attention to itself (module docstring): out [T, H, D] bf16. `starts`, `lengths`: int64
    CPU tensors [segments] (each segment's tokens of the row; rows outside every segment are left unwritten);
    `causal`: each token sees the segment's keys up to its own; `amx`: the AMX tile path (None: where
    `amx_available()` and the head dim is a multiple of 32; True requires it). Check `usable` first."""
    lib = _load()
    assert lib is not None, "check usable() first"
    _, heads, tokens, dim = query.shape
    if amx is None:
        amx = dim % 32 == 0 and amx_available()
    out = torch.empty(tokens, heads, dim, dtype=torch.bfloat16)
    status = lib.pagedq_varlen_attention_bf16(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), starts.data_ptr(), lengths.data_ptr(),
        len(lengths), heads, key.shape[1], dim, query.stride(2), query.stride(1), key.stride(2), key.stride(1),
        scale, causal, torch.get_num_threads(), amx,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"bf16 varlen attention kernel failed (status {status})")
    return out
