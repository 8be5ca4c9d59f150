"""Each row's top k for beam search: one pass of native code over the logits instead of four of torch's.

Beam search needs, per beam row, the best K = 2 * num_beams log-probabilities after generate's processors
(`beam_search.step_beams`). torch does it in four passes over a [rows, vocab] tensor -- widen bf16 to fp32,
log-softmax (max, sum of exponentials, write), then `topk` (which copies every row into (value, index) pairs)
-- about 90 ms for 256 rows of a 58k vocabulary on a busy 2-core CPU. `top_k_rows` reads each row once
(it stays in L2 for its second and third look) and writes k values:

    normalize=False   the top k of the rows as they are (fp32 log-probs, processed already): selection only,
                      so the values are the input's, bit for bit
    normalize=True    the rows are raw logits (fp32 or bf16): log_softmax = (x - max) - log(sum exp(x - max))
                      over the whole row, as torch computes it up to the rounding of the sum (blocks of
                      64 summed in fp32, the blocks in double; exp within 2 ulp); tokens in a row's `bans`
                      are left out of its top k but count in its sum, as generate bans after log-softmax

Ties keep the lower token id first. The kernel is C, compiled on first use like `native` (same compiler,
flags and cache; ctypes releases the GIL; OpenMP threads from torch's team); without a compiler, or with
PAGEDQ_NATIVE=0, `top_k_rows` is torch's log_softmax + index_fill + topk (same values; ties in torch's
order).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from pagedq.worker.engine.cpu.native import c_compiler

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define BLOCK 64

INLINE float widen(const void *p, int64_t i, const int bf16) {
    if (bf16) {
        const uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)p)[i];
}

/* exp(x) for x <= 0, Cephes' expf (within 2 ulp); below -87.3 about 1e-38. Plain C that vectorizes. */
INLINE float exp_le0(float x) {
    x = x < -87.3f ? -87.3f : x;
    const float k = rintf(x * 1.44269504088896341f);
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float y = 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * (r * r) + (r + 1.0f);
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

INLINE float block_max(const void *x, int64_t b, int64_t end, const int bf16) {
    float m = -INFINITY;
    for (int64_t i = b; i < end; i++) {
        const float v = widen(x, i, bf16);
        m = v > m ? v : m;
    }
    return m;
}

/* The top k of row x[0..n) (value descending, lower index first on ties), leaving out `bans`; then, when
 * normalizing, each value v becomes (v - max) - log(sum exp(x - max)) over the whole row. One pass over the
 * row in blocks of 64 (in L1 for the block's max, its exponentials and, rarely, its top-k scan): the sum is
 * kept against the running maximum, rescaled (in double) when a block raises it. */
INLINE void row_top_k(const void *x, int64_t n, const int bf16, int normalize, int64_t k, const int64_t *bans,
                      int64_t nbans, float *vals, int64_t *idx) {
    float m = -INFINITY, worst = -INFINITY;
    double total = 0.0;
    int64_t c = 0;
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t end = b + BLOCK < n ? b + BLOCK : n;
        const float bm = block_max(x, b, end, bf16);
        if (normalize && bm > -INFINITY) {
            if (bm > m) {
                if (m > -INFINITY) total *= exp((double)m - (double)bm);
                m = bm;
            }
            float s = 0.0f;
            for (int64_t i = b; i < end; i++) s += exp_le0(widen(x, i, bf16) - m);
            total += s;
        }
        if (c == k && !(bm > worst)) continue;
        for (int64_t i = b; i < end; i++) {
            const float v = widen(x, i, bf16);
            if (c == k && !(v > worst)) continue;
            int banned = 0;
            for (int64_t t = 0; t < nbans; t++) banned |= bans[t] == i;
            if (banned) continue;
            int64_t j = c < k ? c++ : k - 1;
            while (j > 0 && v > vals[j - 1]) {
                vals[j] = vals[j - 1];
                idx[j] = idx[j - 1];
                j--;
            }
            vals[j] = v;
            idx[j] = i;
            worst = vals[c - 1];
        }
    }
    for (int64_t j = c; j < k; j++) vals[j] = -INFINITY, idx[j] = 0; /* fewer than k tokens left */
    if (normalize) { /* a row of -inf only (nothing finite) stays -inf */
        const float logsum = (float)log(total);
        for (int64_t j = 0; j < c; j++) vals[j] = m > -INFINITY ? (vals[j] - m) - logsum : -INFINITY;
    }
}

int pagedq_top_k_rows(const void *x, int64_t rows, int64_t n, int64_t row_stride, int bf16, int normalize,
                      int64_t k, const int64_t *ban_start, const int64_t *bans, float *vals, int64_t *idx,
                      int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b0 = ban_start ? ban_start[r] : 0, b1 = ban_start ? ban_start[r + 1] : 0;
        if (bf16)
            row_top_k((const uint16_t *)x + r * row_stride, n, 1, normalize, k, bans + b0, b1 - b0, vals + r * k,
                      idx + r * k);
        else
            row_top_k((const float *)x + r * row_stride, n, 0, normalize, k, bans + b0, b1 - b0, vals + r * k,
                      idx + r * k);
    }
    return 0;
}
"""

_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _build(openmp: bool) -> Path:
    """Compile `_SOURCE` into the native cache (a name hashing source, flags and CPU; written then renamed).
    Compiled and linked in two steps: linking with -ffast-math would turn on flush-to-zero process-wide."""
    cc = c_compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    flags = [*_FLAGS, "-fopenmp"] if openmp else _FLAGS
    link = ["-shared", "-fopenmp"] if openmp else ["-shared"]
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = "\n".join(sorted({ln for ln in cpu.splitlines() if ln.startswith(("model name", "flags"))}))
    key = hashlib.sha256("\n".join([_SOURCE, cc, *flags, *link, cpu]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PAGEDQ_NATIVE_CACHE") or Path.home() / ".cache" / "pagedq" / "native")
    target = cache / f"beam_topk-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        source, obj, lib = Path(tmp, "beam_topk.c"), Path(tmp, "beam_topk.o"), Path(tmp, "beam_topk.so")
        source.write_text(_SOURCE)
        try:
            subprocess.run([cc, *flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True, text=True)
            subprocess.run([cc, *link, str(obj), "-o", str(lib), "-lm"], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"compiling beam_topk failed: {exc.stderr.strip()[-2000:]}") from exc
        os.replace(lib, target)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("PAGEDQ_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
            return None
        for openmp in (True, False):
            try:
                lib = ctypes.CDLL(str(_build(openmp)))
            except (OSError, RuntimeError) as exc:
                log.log(logging.INFO if openmp else logging.WARNING, "native beam top-k (openmp=%s): %s", openmp, exc)
                continue
            fn = lib.pagedq_top_k_rows
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            fn.argtypes = [p, i64, i64, i64, ctypes.c_int, ctypes.c_int, i64, p, p, p, p, ctypes.c_int]
            fn.restype = ctypes.c_int
            _lib = lib
            return _lib
        log.warning("native beam top-k unavailable, using torch's log_softmax and topk")
        return None


def native_available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def top_k_rows(
    x: torch.Tensor, k: int, *, normalize: bool, bans: Sequence[Sequence[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top `k` (module docstring): values fp32 [rows, k] (-inf past a row's last unbanned token)
    and token ids int64 [rows, k], best first. `x` [rows, vocab], fp32 or bf16 (normalize) or fp32 (not).
    `bans[r]`: tokens left out of row r's top k (normalize only: the rows of `normalize=False` are
    processed already)."""
    rows, vocab = x.shape
    k = min(k, vocab)
    lib = _load()
    usable = (
        lib is not None
        and x.device.type == "cpu"
        and x.dtype in ((torch.float32, torch.bfloat16) if normalize else (torch.float32,))
        and x.stride(-1) == 1
        and rows > 0
    )
    if not usable:
        return _torch_top_k_rows(x, k, normalize=normalize, bans=bans)
    assert lib is not None
    vals = torch.empty(rows, k, dtype=torch.float32)
    idx = torch.empty(rows, k, dtype=torch.int64)
    ban_start = ban_ids = None
    if bans is not None and any(bans):
        starts = [0]
        for row in bans:
            starts.append(starts[-1] + len(row))
        ban_start = torch.tensor(starts, dtype=torch.int64)
        ban_ids = torch.tensor([t for row in bans for t in row] or [0], dtype=torch.int64)
    status = lib.pagedq_top_k_rows(
        x.data_ptr(), rows, vocab, x.stride(0), x.dtype == torch.bfloat16, normalize, k,
        None if ban_start is None else ban_start.data_ptr(), None if ban_ids is None else ban_ids.data_ptr(),
        vals.data_ptr(), idx.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"beam top-k kernel failed (status {status})")
    return vals, idx


def _torch_top_k_rows(
    x: torch.Tensor, k: int, *, normalize: bool, bans: Sequence[Sequence[int]] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.log_softmax(x, dim=-1, dtype=torch.float32) if normalize else x
    if bans is not None and any(bans):
        rows = [r for r, row in enumerate(bans) for _ in row]
        tokens = [t for row in bans for t in row]
        scores = scores.clone() if scores is x else scores
        scores[torch.tensor(rows, device=x.device), torch.tensor(tokens, device=x.device)] = float("-inf")
    return torch.topk(scores, k)
