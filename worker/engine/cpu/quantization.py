"""int8 linear layers on CPU: per-token activations x per-channel weights, int32 accumulation (W8A8).

`quantize_int8(model)` swaps a loaded fp32 transformers model's linear layers, in place, for `Int8Linear`:

    weight      int8 [out, in], symmetric per output channel: w ~= weight * weight_scale[out]
    activation  quantized on every call, symmetric per row (token): x ~= q * s[row], s = max|x[row]| / 127
    product     q @ weight^T in int32, times weight_scale, in oneDNN's int8 GEMM (VNNI / AMX-int8;
                `torch.ops.onednn.qlinear_pointwise`, the op inductor's x86 int8 path calls, on a weight
                pre-packed once), then y = that * s[row] + bias in fp32

Per-row (not per-tensor) activation scales make a row's result independent of the other rows of the batch:
a request gets the same output alone, padded, packed or batched with others, which the engine's load-time
self-checks (packed / paged forward against the model's own forward of one input) rely on; per-tensor
dynamic quantization (torch.ao's `quantize_dynamic`) changes every row with the batch's largest value.
But rounding to int8 is a step function: where the engine's fp32 attention differs from the eager forward's
in the last bit (~1e-6), a value sitting at a rounding boundary lands one step (max|row| / 127) apart, and the
step propagates through the layers. Tiny models rarely hit one; real ones do (measured, self-check probes:
W1's 56M Llama 2.2e-2 relative, BERT-base packing 7.3e-3, Marian 512 6e-7; bf16: 1.1e-2, 1.1e-2, 2.1e-2).
So int8 models need the self-checks' half-precision tolerances (6e-2 causal and seq2seq, 4e-2 packing),
not fp32's (1e-3, 1e-3, 1e-4): `quantization_summary(model)` tells them a model is quantized.

Kernel (`int8_kernel()`, decided once per process, then per layer shape by `Int8Linear.kernel`): the fastest
exact one of oneDNN's fused int8 GEMM on int8 activations and on uint8 ones (q + 128, zero point 128: oneDNN's
u8 x s8 VNNI path) where the CPU has VNNI (avx512_vnni, avx_vnni or amx_int8), `torch._int_mm` (int32 products,
then the scales) and the fp32 emulation, timed on a [64, 512] x [512, 512] product, and each layer's shape again
on 32 rows among the kernels within 10x of the best (`_layer_kernel`). A candidate must first give the exact
integer products on worst-case operands (without VNNI, oneDNN sums u8 x s8 pairs in saturating int16). Measured:
on the Intel AMX machine oneDNN wins; on an AMD EPYC and an Intel Xeon with AVX512-VNNI (no AMX) oneDNN's int8 x
int8 path gets a reference kernel (500x slower than fp32), `_int_mm` wins on small layers (2.7x the emulation
at 64 rows, 5.8x at 7) and, on the Xeon, oneDNN's u8 path on an LM head. Elsewhere (no exact int8 kernel, or
none faster; `PAGEDQ_INT8_KERNEL=emulated`; `emulated_int8()` in tests) the same arithmetic runs as an fp32
GEMM over the int8 values: the integer products and their sums are exact in
fp32 for in_features <= 1040, so results equal the int8 kernel's bit for bit (above that they differ by fp32
rounding, ~1e-7 relative). That path has fp32 speed and an fp32 copy of the int8 weights: it exists so that an
int8 registry entry serves everywhere, not to be fast there. The pre-packed weight (oneDNN kernel) is a second
int8 copy: an int8 model holds 2 bytes per quantized weight, against fp32's 4 (8 with cpu.linear's packed copy).

Why this method (measured on the 2-core AVX-512 VNNI/AMX machine, torch 2.13, one thread, ms per call, min of
runs): torch.ao's `quantize_dynamic` (onednn engine) is as fast per layer but per-tensor; weight-only int8
(`torch.ops.aten._weight_int8pack_mm`) has no fast CPU kernel here ([1024 x 768] x [768 x 3072]: 4570 fp32 /
219 bf16 activations, against 58 for fp32 MKL); `torch._int_mm` needs a separate dequantizing epilogue (2x
slower than oneDNN's fused per-channel scale). Whole models (bench/precision.py, one thread, median, load
~10 on 2 cores; ratios to fp32 with pre-packed weights): BERT-base forward of 8 x 128 tokens int8 2.1-2.3x
(bf16 3.7-4.1x); W1's 56M Llama, one 32-row decode step in pagedq's engine int8 1.8-2.3x (bf16 2.1-2.7x; int8
with an fp32 head 1.4-1.8x); Marian 512 encoder int8 1.9x (bf16 3.5x), decoder step 1.8-2.0x (bf16 1.9-2.0x).
On this AMX machine bf16 is as fast or faster; int8 pays where bf16 has no hardware path (VNNI without
AVX512-BF16/AMX: Cascade Lake, Ice Lake).

The passes around the GEMM (native/int8_linear.c, `_native_passes`): per-token quantization in torch is 4-5
eager passes over the activations and the epilogue (int32 -> fp32, the two scales, the bias) 3-4 over the
products, each an op call with its own overhead; on a decode step of a few rows, and on the LM head's
[rows, 58101] products, they cost about as much as the int8 GEMM itself, and W4's Marian ran int8 slower
than fp32 (greedy, `bench/tasks.py --workload w4 --quick`: 111 against 184 tok/s). Two native passes (one
over the activations, one over the products, in place) compute the same IEEE operations in the same order,
bit for bit the eager result (tested), with torch's eager passes kept where the library cannot be built.
ms per call (best of 600), Intel Xeon with AVX512-VNNI (no AMX, no AVX512-BF16), 2 threads, [out x in],
fp32 pre-packed / int8 with eager passes / int8 with native passes:
[512 x 512] 8 rows 0.077 / 0.078 / 0.045, 128 rows 0.390 / 0.281 / 0.172; [2048 x 512] 32 rows 0.414 / 0.294 /
0.203; [512 x 2048] 32 rows 0.320 / 0.254 / 0.198; [58101 x 512] 32 rows 12.5 / 9.6 / 8.0, 128 rows 35.6 /
23.7 / 18.1; one row stays slower than fp32 ([512 x 512] 0.026 / 0.066 / 0.040: three calls' overhead).

Which layers: every `nn.Linear` (and transformers' GPT-2-style `Conv1D`) of the model, except
  - the task head outside the base model (classifier, QA span head: a few columns, no speed to gain) and a
    pooler (one row per input);
  - the LM head (output embeddings) if `lm_head=False` (default True: see `DEFAULT_LM_HEAD`).
Embeddings and norms stay fp32; activations between layers stay fp32. `Int8Linear` is not an `nn.Linear`, so
cpu.linear's pre-packing (fp32 / bf16 oneDNN) leaves it alone and packs only the layers kept fp32.
CPU only: `check_device` refuses other devices.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedq.worker.engine.cpu.native import load_library

log = logging.getLogger(__name__)

#: attribute set on a quantized model (its `QuantizationSummary`)
SUMMARY_ATTR = "pagedq_quantization"
#: quantize the LM head of generative models: decode steps 1.3-1.4x faster than with an fp32 head, greedy
#: agreement with fp32 the same (bench/precision.py, random weights); `quantize_int8(lm_head=False)` keeps it
DEFAULT_LM_HEAD = True
#: in_features up to which fp32 sums of int8 products are exact (1040 x 127 x 127 < 2**24)
EXACT_FP32_IN_FEATURES = 1040
ONEDNN, ONEDNN_U8, INT_MM, EMULATED = "onednn-int8", "onednn-int8-u8", "int-mm", "emulated-fp32"
_EPS = 1e-12  # scale floor: an all-zero row quantizes to zeros
_U8_ZERO = 128  # ONEDNN_U8's activations: q + 128 as uint8, zero point 128
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_forced_emulation = False


def _cpu_has_vnni() -> bool:
    try:
        if torch.cpu._is_vnni_supported():  # avx512_vnni
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in _VNNI_FLAGS)


def _onednn_ops_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.onednn, op) for op in ("qlinear_prepack", "qlinear_pointwise")
        )
    except RuntimeError:  # an op namespace torch was built without
        return False


def _onednn_linear(q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q @ weight^T) * scale[out] -> fp32 [M, out], through oneDNN (`zero`: int64 zeros [out]); q int8 [M, in], or
    uint8 holding q + 128 (ONEDNN_U8: zero point 128, oneDNN's u8 x s8 kernels)."""
    zero_point = _U8_ZERO if q.dtype == torch.uint8 else 0
    return torch.ops.onednn.qlinear_pointwise(
        q, 1.0, zero_point, packed, scale, zero, None, 1.0, 0, torch.float32, "none", [], ""
    )  # fmt: skip


def _as_u8(q: torch.Tensor) -> torch.Tensor:
    """int8 values (any integer or integral float dtype) -> uint8 q + 128."""
    return (q.to(torch.int16) + _U8_ZERO).to(torch.uint8)


def _worst_case_operands() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (5, 96), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    q[0], q[1], w[0], w[1] = 127, -127, 127, -127  # 127 * 127 pairs: 32258 each, past int16 in u8 form
    return q, w


def _exact(name: str, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """`product(q, w)` gives q @ w^T exactly on worst-case operands (any failure: not used)."""
    try:
        q, w = _worst_case_operands()
        return torch.equal(product(q, w).float(), (q.long() @ w.long().t()).float())
    except Exception:  # noqa: BLE001 - any failure means: not this kernel
        log.info("int8 kernel %s unavailable", name, exc_info=True)
        return False


def _onednn_product(q: torch.Tensor, w: torch.Tensor, u8: bool = False) -> torch.Tensor:
    out = w.shape[0]
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    return _onednn_linear(_as_u8(q) if u8 else q, packed, torch.ones(out), torch.zeros(out).long())


def _int_mm_product(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(q, w.t().contiguous())


def _best_seconds(fn: Callable[[], Any], repeats: int = 5, give_up: float = float("inf")) -> float:
    """The fastest of `repeats` calls after a warm-up; only the warm-up's time when that alone is over `give_up`
    (a kernel 500x slower need not be timed six times at start-up)."""
    start = time.perf_counter()
    fn()  # warm-up: oneDNN builds its primitive on the first call
    warm_up = time.perf_counter() - start
    if warm_up > give_up:
        return warm_up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@cache
def _exact_kernels() -> tuple[str, ...]:
    """The kernels that give exact integer products on this CPU, the emulation first (module docstring)."""
    found = [EMULATED]
    if _cpu_has_vnni() and _onednn_ops_available():
        found += [name for name, u8 in ((ONEDNN, False), (ONEDNN_U8, True))
                  if _exact(name, partial(_onednn_product, u8=u8))]  # fmt: skip
    if hasattr(torch, "_int_mm") and _exact(INT_MM, _int_mm_product):
        found.append(INT_MM)
    return tuple(found)


def _candidates(
    rows: int = 64, in_features: int = 512, out_features: int = 512, kernels: tuple[str, ...] | None = None
) -> dict[str, Callable[[], Any]]:
    """The exact kernels of this CPU (or those of `kernels`), each as a [rows, in] x [in, out] product to time."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    found: dict[str, Callable[[], Any]] = {}
    for name in _exact_kernels() if kernels is None else kernels:
        if name == EMULATED:
            found[name] = partial(F.linear, q.float(), w.float())
        elif name == INT_MM:
            found[name] = partial(torch._int_mm, q, w.t().contiguous())
        else:
            packed = torch.ops.onednn.qlinear_prepack(w, None)
            x = _as_u8(q) if name == ONEDNN_U8 else q
            found[name] = partial(_onednn_linear, x, packed, torch.ones(out_features), torch.zeros(out_features).long())
    return found


#: attempts of the kernel probe while the emulation still looks fastest (module docstring), and the slowdown
#: against the emulation past which a kernel is not timed again (a reference kernel, 500x slower or more)
PROBE_ATTEMPTS, PROBE_DROP = 5, 300.0


def _timings(candidates: dict[str, Callable[[], Any]], what: str) -> dict[str, float]:
    """Seconds per call of each of `candidates` (the emulation first); the fastest logged.

    On a shared VM a moment when a core is taken away can make `_int_mm` 50x slower for a fraction of a second
    (measured here: 5.6 ms per call instead of 0.08 for a whole probe), which once made a process run int8 on
    the emulation for its lifetime. So while the emulation looks fastest the probe looks again, up to
    `PROBE_ATTEMPTS` times 0.1 s apart, keeping each kernel's fastest time."""
    seconds: dict[str, float] = {}
    for attempt in range(PROBE_ATTEMPTS):
        if attempt:
            time.sleep(0.1)
        for name, product in candidates.items():  # the emulation first: the bar the others must beat
            bar = PROBE_DROP * seconds.get(EMULATED, float("inf"))
            if seconds.get(name, 0.0) > bar:
                continue  # a reference kernel: not timed again
            seconds[name] = min(seconds.get(name, float("inf")), _best_seconds(product, give_up=bar))
        best = min(seconds, key=seconds.__getitem__)
        if best != EMULATED or len(candidates) == 1:
            break
    log.info("int8 kernel for %s: %s (ms per call: %s)", what, best,
             ", ".join(f"{k} {v * 1e3:.2f}" for k, v in seconds.items()))  # fmt: skip
    return seconds


def _emulation_asked() -> bool:
    return os.environ.get("PAGEDQ_INT8_KERNEL", "auto") == "emulated"  # e.g. to test the emulation on a VNNI CPU


@cache
def _probe() -> dict[str, float]:
    return _timings(_candidates(), "[64, 512] x [512, 512]")


@cache
def _best_kernel() -> str:
    """The fastest exact kernel on a [64, 512] x [512, 512] product (module docstring)."""
    if _emulation_asked():
        return EMULATED
    seconds = _probe()
    return min(seconds, key=seconds.__getitem__)


@cache
def _layer_kernel(in_features: int, out_features: int) -> str:
    """The fastest exact kernel for a layer of this shape, timed on 32 rows (a decode step's order of size):
    which kernel wins depends on it (Intel Xeon, AVX512-VNNI, 2 threads, ms per call at 32 rows: [512 x 512]
    int_mm 0.030, oneDNN u8 0.052; [58101 x 512] int_mm 5.4, oneDNN u8 3.3; one row 3.8 and 0.93)."""
    best = _best_kernel()
    if best == EMULATED:
        return best
    seconds = _probe()  # kernels 10x slower than the best there (a reference kernel) are not timed on big shapes
    contenders = tuple(name for name, t in seconds.items() if t <= 10 * seconds[best])
    if len(contenders) == 1:
        return best
    timed = _timings(_candidates(32, in_features, out_features, contenders),
                     f"[32, {in_features}] x [{in_features}, {out_features}]")  # fmt: skip
    return min(timed, key=timed.__getitem__)


def int8_kernel() -> str:
    """The fastest exact kernel here on a [64, 512] x [512, 512] product (module docstring); each layer runs the
    fastest for its own shape (`Int8Linear.kernel`)."""
    return EMULATED if _forced_emulation else _best_kernel()


@contextmanager
def emulated_int8() -> Iterator[None]:
    """Run every `Int8Linear` through the fp32 emulation while the block runs (tests, measurements)."""
    global _forced_emulation
    before, _forced_emulation = _forced_emulation, True
    try:
        yield
    finally:
        _forced_emulation = before


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (int8 [out, in], fp32 scale [out]), symmetric per output channel."""
    w = weight.detach().float().contiguous()
    scale = w.abs().amax(dim=1).clamp(min=_EPS) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


_NATIVE_SOURCE = Path(__file__).with_name("native") / "int8_linear.c"


def _configure_native(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pagedq_quantize_rows.argtypes = [p, i64, i64, i64, ctypes.c_float, i32, p, p, i32]
    lib.pagedq_quantize_rows.restype = i32
    lib.pagedq_dequantize.argtypes = [p, i32, i64, i64, p, p, p, p, i32]
    lib.pagedq_dequantize.restype = i32


def _native_passes() -> ctypes.CDLL | None:
    """The native quantize/dequantize passes (native/int8_linear.c, built `exact`), or None (no compiler,
    PAGEDQ_NATIVE=0): then torch's eager passes, which give the same bits."""
    return load_library(_NATIVE_SOURCE, _configure_native, "native int8 quantize/dequantize", "torch's eager passes",
                        exact=True)  # fmt: skip


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [M, in] -> (int8-valued fp32 [M, in], scale [M]): x ~= q * scale[:, None], per row symmetric."""
    scale = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_()).clamp_(min=_EPS).div_(127.0)  # no |x| copy
    return x.div(scale[:, None]).round_(), scale  # |q| <= 127: the row's largest value maps to +-127


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and per-token int8 activations (module docstring).

    `weight` is the int8 tensor [out, in] (as bitsandbytes' int8 layers have it: transformers code that casts
    activations to a layer's weight dtype skips int8 weights), `weight_scale` its per-channel fp32 scale,
    `bias` fp32. Inputs of any float dtype; the result has the input's dtype (computed in fp32)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    _cached: tuple[tuple[Any, ...], torch.Tensor] | None = None  # (key, packed or fp32 weight), rebuilt on use
    _zero: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, scale = quantize_weight(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        if q.device.type == "cpu":
            self._prepared(self.kernel())  # chosen and packed at load, not on the first request

    def kernel(self) -> str:
        """The int8 kernel this layer runs on CPU: the fastest exact one for its shape (`_layer_kernel`), or the
        emulation inside `emulated_int8()`."""
        return EMULATED if _forced_emulation else _layer_kernel(self.in_features, self.out_features)

    @classmethod
    def from_float(cls, module: nn.Module) -> Int8Linear:
        """From an `nn.Linear` (weight [out, in]) or a transformers `Conv1D` (weight [in, out])."""
        weight, bias = _weight(module), module.bias
        assert bias is None or isinstance(bias, torch.Tensor)
        return cls(weight.t() if _is_conv1d(module) else weight, bias)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the packed weight behind (an opaque oneDNN tensor); it is rebuilt on use."""
        state = super().__getstate__()
        state.pop("_cached", None)
        state.pop("_zero", None)
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """`add`: an fp32 [out] vector added to the result where the bias would be, for a layer without one:
        the same bits as `layer(x) + add` in one pass less (an LM head's `final_logits_bias`)."""
        if add is not None and (
            self.bias is not None or add.dtype != torch.float32 or add.shape != (self.out_features,)
        ):
            raise ValueError(f"add= takes an fp32 [{self.out_features}] vector, on a layer without a bias")
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32:
            rows = rows.float()
        kernel = self.kernel() if x.device.type == "cpu" else EMULATED
        lib = _native_passes() if kernel != EMULATED and rows.shape[0] > 0 else None
        y = self._eager(rows, kernel, add) if lib is None else self._native(lib, rows, kernel, add)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def _native(
        self, lib: ctypes.CDLL, rows: torch.Tensor, kernel: str, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The int8 kernel between the native quantize and dequantize passes: one pass over the activations,
        one over the products (torch's eager passes are four and three), the same bits as `_eager`. `add`:
        `forward`'s, in place of the (absent) bias."""
        bias = self.bias if add is None else add.contiguous()
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        m, k = rows.shape
        threads = torch.get_num_threads()
        u8 = kernel == ONEDNN_U8
        q = torch.empty(m, k, dtype=torch.uint8 if u8 else torch.int8)
        scale = torch.empty(m, dtype=torch.float32)
        lib.pagedq_quantize_rows(rows.data_ptr(), m, k, rows.stride(0), _EPS, _U8_ZERO if u8 else 0, q.data_ptr(),
                                 scale.data_ptr(), threads)  # fmt: skip
        if kernel in (ONEDNN, ONEDNN_U8):  # the per-channel scale is fused into oneDNN's GEMM already
            acc, column_scale = _onednn_linear(q, self._prepared(kernel), self.weight_scale, self._zero), None
        else:
            acc, column_scale = torch._int_mm(q, self._prepared(kernel)).contiguous(), self.weight_scale
        out = acc if acc.dtype == torch.float32 else acc.view(torch.float32)  # in place: one size, read then written
        lib.pagedq_dequantize(
            acc.data_ptr(), acc.dtype == torch.int32, m, self.out_features,
            None if column_scale is None else column_scale.data_ptr(), scale.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), threads,
        )  # fmt: skip
        return out

    def _eager(self, rows: torch.Tensor, kernel: str, add: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if add is None else add
        q, scale = quantize_rows(rows)
        if kernel in (ONEDNN, ONEDNN_U8):
            x = _as_u8(q) if kernel == ONEDNN_U8 else q.to(torch.int8)
            y = _onednn_linear(x.contiguous(), self._prepared(kernel), self.weight_scale, self._zero)
        elif kernel == INT_MM:
            y = torch._int_mm(q.to(torch.int8), self._prepared(kernel)).float().mul_(self.weight_scale)
        else:
            y = F.linear(q, self._prepared(kernel)).mul_(self.weight_scale)  # the same integers, summed in fp32
        y.t().mul_(scale)  # through the transpose: a broadcast along rows is several times slower
        if bias is not None:
            y.add_(bias)
        return y

    def _prepared(self, kernel: str) -> torch.Tensor:
        """The weight as `kernel` takes it: oneDNN's packed int8 copy, its transpose for `_int_mm` [in, out], or an
        fp32 copy of the int8 values."""
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # inference tensors have no version counter
            version = -1
        key = (kernel, w.data_ptr(), w.device, version)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                if kernel in (ONEDNN, ONEDNN_U8):
                    ready = torch.ops.onednn.qlinear_prepack(w, None)
                elif kernel == INT_MM:
                    ready = w.t().contiguous()
                else:
                    ready = w.to(torch.float32)
            self._cached = (key, ready)
            self._zero = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)  # oneDNN's weight zero points
        return self._cached[1]


@dataclass(frozen=True)
class QuantizationSummary:
    """What `quantize_int8` did, for logs and stats."""

    quantized: int  # linear layers now Int8Linear
    kept: int  # linear layers left fp32 (task heads, poolers, ...)
    int8_params: int  # weight elements now int8
    fp32_params: int  # weight elements of the kept linear layers
    kernel: str  # the process's probe: "onednn-int8", "onednn-int8-u8", "int-mm" or "emulated-fp32"
    lm_head: bool
    layer_kernels: tuple[tuple[str, int], ...] = ()  # (kernel, layers running it) of this model's int8 layers

    def describe(self) -> str:
        via = ", ".join(f"{k} x{n}" for k, n in self.layer_kernels) or self.kernel
        return (
            f"int8 W8A8 (per-channel weights, per-token activations): {self.quantized} linear layers "
            f"({self.int8_params / 1e6:.1f}M weights) int8 via {via}, {self.kept} kept fp32 "
            f"({self.fp32_params / 1e6:.1f}M), LM head {'int8' if self.lm_head else 'fp32'}"
        )


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _kept_fp32(model: nn.Module, lm_head: bool) -> set[int]:
    """ids of the linear modules `quantize_int8` leaves fp32 (module docstring)."""
    kept: set[int] = set()
    base = getattr(model, "base_model", model)
    if base is not model:  # the task head lives outside the base model
        inside = {id(m) for m in base.modules()}
        kept |= {id(m) for m in model.modules() if _is_linear(m) and id(m) not in inside}
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, nn.Module):
        kept |= {id(m) for m in pooler.modules() if _is_linear(m)}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        if lm_head:
            kept.discard(id(head))
        else:
            kept.add(id(head))
    return kept


def check_device(device: torch.device | str) -> None:
    """int8 serves on CPU only: the kernel is oneDNN's CPU int8 GEMM."""
    if torch.device(device).type != "cpu":
        raise ValueError(
            f"dtype 'int8' runs on CPU only (oneDNN int8 kernels); this model is placed on {device}: "
            "use dtype 'bfloat16' or 'float16' on a GPU, or device 'cpu'"
        )


def quantize_int8(model: nn.Module, *, lm_head: bool = DEFAULT_LM_HEAD) -> nn.Module:
    """Swap the model's linear layers for `Int8Linear` in place (module docstring says which); returns `model`.

    The model must be on CPU with fp32 linear weights (load it fp32, then quantize). Idempotent: already
    quantized layers are left alone. `quantization_summary(model)` describes what was done."""
    kept_ids = _kept_fp32(model, lm_head)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    kept = kept_params = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if not _is_linear(child):
                continue
            if id(child) in kept_ids:
                kept += 1
                kept_params += _weight(child).numel()
                continue
            check_device(_weight(child).device)
            swaps.append((parent, name, child))
    done: dict[int, Int8Linear] = {}  # a module shared by two parents is quantized once
    for parent, name, child in swaps:
        if id(child) not in done:
            done[id(child)] = Int8Linear.from_float(child)
        setattr(parent, name, done[id(child)])
    int8_params = sum(m.weight.numel() for m in done.values())
    previous = getattr(model, SUMMARY_ATTR, None)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    summary = QuantizationSummary(
        quantized=len(done) + (previous.quantized if previous else 0),
        kept=kept,
        int8_params=int8_params + (previous.int8_params if previous else 0),
        fp32_params=kept_params,
        kernel=int8_kernel(),
        lm_head=isinstance(head, Int8Linear),
        layer_kernels=tuple(Counter(m.kernel() for m in model.modules() if isinstance(m, Int8Linear)).most_common()),
    )
    setattr(model, SUMMARY_ATTR, summary)
    log.info("%s: %s", type(model).__name__, summary.describe())
    return model


def check_dtype(model: Any) -> torch.dtype:
    """The dtype whose tolerance the load-time self-checks apply to `model`: bf16's for an int8 model.

    Rounding activations to int8 is a step function: a last-bit difference between the engine's attention
    and the model's own forward can move a value across a rounding boundary, and that spreads through the
    layers (measured at real sizes: 2.2e-2 relative on a 56M Llama, 7.3e-3 on BERT-base, against 1e-3 and
    1e-4 for fp32), the same order as bf16's rounding."""
    return torch.bfloat16 if quantization_summary(model) is not None else model.dtype


def quantization_summary(model: Any) -> QuantizationSummary | None:
    """What `quantize_int8` did to `model`, or None if it was not quantized."""
    summary = getattr(model, SUMMARY_ATTR, None)
    return summary if isinstance(summary, QuantizationSummary) else None
