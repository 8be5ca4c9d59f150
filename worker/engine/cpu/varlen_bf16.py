"""bf16 attention within the segments of a packed row on AVX512-BF16 CPUs (`native/varlen_attention.c`).

The packed classifier's attention (`encoder/varlen_attention.py`) calls torch's SDPA once per group of
similar-length segments. In bf16 on a CPU with AVX512-BF16 but without AMX, that SDPA runs at fp32's speed
(measured on W3's BERT-base groups: 8 x 200 tokens 11.7 ms bf16 against 11.6 ms fp32), so a bf16 step spent
~20% of its time there against ~11% in fp32. The kernel attends each segment to itself at its own length (no
padding, no groups) with the CPU's bf16 dot-product instruction, in the arithmetic of torch's bf16 flash
attention (fp32 scores, softmax and sums; probabilities rounded to bf16 before they weight V).

`varlen_attention_bf16(q, k, v, starts, lengths, scale)` takes q/k/v as transformers hands them to an
attention function, [1, H, T, D] bf16 views of [T, H * D] projections, and returns out [T, H, D] bf16.
`available()` is False without a compiler, with PAGEDQ_NATIVE=0, or on a CPU whose build lacks AVX512-BF16;
`usable(...)` adds the shape checks; callers keep SDPA otherwise.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from pagedq.worker.engine.cpu.native import load_library

_SOURCE = Path(__file__).with_name("native") / "varlen_attention.c"
MAX_HEAD_DIM = 256


def _configure(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.pagedq_varlen_bf16_supported.argtypes = []
    lib.pagedq_varlen_bf16_supported.restype = ctypes.c_int
    fn = lib.pagedq_varlen_attention_bf16
    fn.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int


_supported: bool | None = None


def _load() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _configure, "native bf16 varlen attention", "SDPA per group of segments")


def available() -> bool:
    """Whether the kernel is built with AVX512-BF16 for this CPU (builds it on the first call)."""
    global _supported
    if _supported is None:
        lib = _load()
        _supported = lib is not None and bool(lib.pagedq_varlen_bf16_supported())
    return _supported


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """The kernel applies: bf16 CPU tensors [1, H, T, D] sharing one layout with unit stride along D, H * D a
    multiple of 16 up to `MAX_HEAD_DIM` per head, as many key/value heads as query heads, kernel available."""
    if query.dtype != torch.bfloat16 or query.device.type != "cpu" or query.dim() != 4 or query.shape[0] != 1:
        return False
    head_dim = query.shape[3]
    if head_dim % 16 or head_dim > MAX_HEAD_DIM:
        return False
    layout = query.stride()[1:]
    for t in (key, value):
        if t.dtype != query.dtype or t.shape != query.shape or t.stride()[1:] != layout:
            return False
    return layout[2] == 1 and layout[0] % 2 == 0 and layout[1] % 2 == 0 and available()


def varlen_attention_bf16(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Each segment's attention to itself (module docstring): out [T, H, D] bf16. `starts`, `lengths`: int64
    CPU tensors [segments] that tile the row; check `usable` first."""
    lib = _load()
    assert lib is not None, "check usable() first"
    _, heads, tokens, dim = query.shape
    head_stride, token_stride = query.stride(1), query.stride(2)
    out = torch.empty(tokens, heads, dim, dtype=torch.bfloat16)
    status = lib.pagedq_varlen_attention_bf16(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), starts.data_ptr(), lengths.data_ptr(),
        len(lengths), heads, dim, token_stride, head_stride, scale, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"bf16 varlen attention kernel failed (status {status})")
    return out
