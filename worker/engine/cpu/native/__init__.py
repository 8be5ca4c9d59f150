"""Native CPU kernels of the engine, compiled from C on first use and loaded with ctypes.

`paged_decode.c` (see its header): paged decode attention (`paged_decode`: fp32 or bf16 queries, K/V blocks
and outputs) and the greedy pick (`argmax_rows`); `beam_topk.c`: each beam row's top k (`cpu.beam_topk`);
`int8_linear.c`: the quantize and dequantize passes of int8 linear layers (`cpu.quantization`, built `exact`).
Each source is built by `load_library` with
the system C compiler (`$CC`, else `cc`) for this CPU (`-march=native`: AVX-512 or AVX2 code where the
CPU has it, plain C otherwise; `$PAGEDQ_NATIVE_MARCH` names another target, e.g. `haswell` or `x86-64`,
which the tests use to check the AVX2 and plain-C builds on any x86 machine) into `$PAGEDQ_NATIVE_CACHE`
(default `~/.cache/pagedq/native`), under a name that hashes the source, the flags and the CPU, so a
rebuilt source or another CPU never loads a stale build; the build is written to a temporary file and
renamed, so concurrent workers are safe. Without a compiler, or with `PAGEDQ_NATIVE=0`,
`paged_decode_available()` is False and the engine keeps its portable path (gather + SDPA; torch's
argmax). ctypes releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode.c")
# -ffast-math for vectorised expf and reductions; infinities keep their meaning (-inf: nothing visible).
# Compiled and linked in two steps: linking with -ffast-math would add crtfastmath.o (GCC < 13), which
# turns on flush-to-zero for the whole process when the library loads, and changes torch's numerics.
# -fopenmp: the kernel's threads are torch's OpenMP team (libgomp.so.1 is already loaded by torch, so the
# library binds to it); without OpenMP it starts pthreads per call, which wait behind torch's spinning team.
_FLAGS = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fPIC", "-std=c11"]
# A source whose results must equal torch's eager arithmetic bit for bit (int8_linear.c): IEEE division, no
# reassociation, no fused multiply-add.
_EXACT_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-std=c11"]
_LINK = ["-shared", "-pthread"]
_OPENMP = ["-fopenmp"]
_lock = threading.Lock()
_libraries: dict[Path, ctypes.CDLL | None] = {}  # every source tried in this process, None if it failed


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def c_compiler() -> str | None:
    """The C compiler the kernels are built with: `$CC`, else `cc` or `gcc` on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(source_path: Path, openmp: bool, exact: bool = False) -> Path:
    """Compile one C source into the native cache (module docstring: flags, cache key, atomic rename); `exact`:
    without -ffast-math and with -ffp-contract=off (results equal to torch's eager arithmetic)."""
    cc = c_compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    base = _EXACT_FLAGS if exact else _FLAGS
    flags, link = (base + _OPENMP, _LINK + _OPENMP) if openmp else (base, _LINK)
    flags = [f"-march={os.environ.get('PAGEDQ_NATIVE_MARCH') or 'native'}", *flags]
    source = source_path.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *flags, *link]).encode() + _cpu_id().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PAGEDQ_NATIVE_CACHE") or Path.home() / ".cache" / "pagedq" / "native")
    target = cache / f"{source_path.stem}-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        obj = tmp + ".o"
        subprocess.run([cc, *flags, "-c", str(source_path), "-o", obj], check=True, capture_output=True, text=True)
        subprocess.run([cc, *link, obj, "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling {source_path.name} failed: {exc.stderr.strip()[-2000:]}") from exc
    finally:
        for leftover in (tmp, tmp + ".o"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target


def load_library(
    source_path: Path, configure: Callable[[ctypes.CDLL], None], what: str, fallback: str, exact: bool = False
) -> ctypes.CDLL | None:
    """The library of `source_path`, built (with OpenMP, else without; `exact`: see `build_library`) and loaded
    once per process, its functions typed by `configure`; None without a compiler, off Linux or with
    PAGEDQ_NATIVE=0 (logged once: `what` is unavailable, the engine uses `fallback`)."""
    if source_path in _libraries:  # loaded (or failed) already: no lock on the kernels' every call
        return _libraries[source_path]
    with _lock:
        if source_path in _libraries:
            return _libraries[source_path]
        lib = None
        if os.environ.get("PAGEDQ_NATIVE", "1") != "0" and sys.platform.startswith("linux"):
            for openmp in (True, False):
                try:
                    lib = ctypes.CDLL(str(build_library(source_path, openmp, exact)))
                    break
                except (OSError, RuntimeError) as exc:
                    log.log(logging.INFO if openmp else logging.WARNING, "%s (openmp=%s): %s", what, openmp, exc)
            if lib is None:
                log.warning("%s unavailable, using %s", what, fallback)
            else:
                configure(lib)
        _libraries[source_path] = lib
        return lib


def _configure(lib: ctypes.CDLL) -> None:
    fn = lib.pagedq_paged_decode
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [*[p] * 8, *[i64] * 7, ctypes.c_float, ctypes.c_float, *[i32] * 4]
    fn.restype = ctypes.c_int
    lib.pagedq_argmax_rows.argtypes = [p, i64, i64, i64, i32, p]
    lib.pagedq_argmax_rows.restype = None


def _load() -> ctypes.CDLL | None:
    return load_library(_SOURCE, _configure, "native paged decode attention", "gather + SDPA")


def paged_decode_available() -> bool:
    """True when the kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


#: What the kernel reads and writes (queries, K/V blocks, outputs).
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def use_native_decode(pages: torch.Tensor, requested: bool | None) -> bool:
    """Whether a runner's decode rows go through the kernel: `requested` None means wherever it applies (a
    pool of `NATIVE_DTYPES` on CPU, the kernel built), False never; True where it cannot apply is an error."""
    applies = pages.device.type == "cpu" and pages.dtype in NATIVE_DTYPES
    if requested and not applies:
        raise ValueError("the native decode kernel needs an fp32 or bf16 KV pool on CPU")
    return applies and requested is not False and paged_decode_available()
_DTYPES = NATIVE_DTYPES


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    table_start: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode rows' attention over their own blocks; scores soft-capped (tanh(s / softcap) * softcap) if given.

    q [rows, H, D] fp32 or bf16; k_cache/v_cache [num_blocks, block_size, KVH, D], both fp32 or both bf16
    (one layer; each block contiguous, blocks any equal distance apart; the two may be one tensor);
    block_ids [N] int64 (flat tables); table_start [rows] int64 (row r's table begins at
    block_ids[table_start[r]]); lens [rows] int64 (keys each row sees, its own token included).
    Returns out [rows, H, D] in `out_dtype` (fp32 or bf16; default q's dtype) and lse [rows, H] (fp32).
    bf16 inputs are widened to fp32 exactly and all arithmetic is fp32 (the fp32 kernel's, in its order);
    a bf16 out is that result rounded to nearest even."""
    lib = _load()
    if lib is None:
        raise RuntimeError("the native paged decode kernel is not available")
    rows, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out_dtype = q.dtype if out_dtype is None else out_dtype
    for t, dtypes in ((q, _DTYPES), (k_cache[0], _DTYPES), (v_cache[0], (k_cache.dtype,)),
                      (block_ids, (torch.int64,)), (table_start, (torch.int64,)), (lens, (torch.int64,))):  # fmt: skip
        if t.dtype not in dtypes or t.device.type != "cpu" or not t.is_contiguous():
            want = " or ".join(str(d) for d in dtypes)
            raise ValueError(f"paged_decode needs contiguous CPU {want} tensors, got {t.dtype} {t.device}")
    if out_dtype not in _DTYPES:
        raise ValueError(f"paged_decode writes fp32 or bf16, not {out_dtype}")
    block_stride = k_cache.stride(0)
    if v_cache.shape != k_cache.shape or v_cache.stride(0) != block_stride:
        raise ValueError("paged_decode needs K and V caches of one shape and block stride")
    out = torch.empty(rows, heads, dim, dtype=out_dtype)
    lse = torch.empty(rows, heads, dtype=torch.float32)
    bf16 = torch.bfloat16
    status = lib.pagedq_paged_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_ids.data_ptr(), table_start.data_ptr(),
        lens.data_ptr(), out.data_ptr(), lse.data_ptr(), rows, heads, kv_heads, dim, block_size, block_stride,
        window or 0, scale, softcap or 0.0, q.dtype == bf16, k_cache.dtype == bf16, out_dtype == bf16,
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"paged decode kernel failed (status {status})")
    return out, lse


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of a 2-D CPU tensor, [rows] int64: the first maximum of each row (the first NaN
    if any), as torch gives it. fp32 and bf16 rows (each contiguous) go through the native kernel, which
    reads bf16 as it is (torch's argmax is 3x slower on bf16 than on fp32, and 3x slower on fp32 than
    the kernel); anything else, or without the kernel, is torch's own argmax."""
    lib = _load()
    if (lib is None or logits.dim() != 2 or logits.device.type != "cpu" or logits.dtype not in _DTYPES
            or logits.stride(-1) != 1 or logits.shape[-1] == 0):  # fmt: skip
        return logits.argmax(dim=-1)
    rows, n = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    lib.pagedq_argmax_rows(logits.data_ptr(), rows, n, logits.stride(0), logits.dtype == torch.bfloat16, out.data_ptr())
    return out
