"""Linear layers on CPU through oneDNN with the weight pre-packed once, as IPEX and inductor's freezing do.

`torch.nn.functional.linear` on CPU calls MKL with the weight in its row-major `[out, in]` layout, and
re-blocks it on every call. oneDNN's `_linear_pointwise` takes a weight reordered once into its
blocked layout. Measured with torch 2.13 on the 2-core AVX-512 CI machine (fp32, ms per call)::

    [32000 x 512] LM head     M=1: 6.5 -> 2.5    M=16: 12.0 -> 3.6   M=64: 22.0 -> 10.7
    [1408 x 512]  MLP up      M=64: 0.58 -> 0.42  M=4096: 30.5 -> 27.4
    [512 x 1408]  MLP down    M=64: 0.54 -> 0.44  M=4096: 36.3 -> 26.9

But a oneDNN call costs about 25 us however small it is, where MKL's `F.linear` on a [64 x 64] weight takes 6
us: a tiny model (or a decode step of a few tokens through a small layer) is 2x slower packed. So only
weights of at least `MIN_PACKED_WEIGHT` elements are packed, and a call whose product is under
`MIN_PACKED_FLOPS` (rows x in x out) takes `F.linear` anyway (us per call, [out x in], rows: MKL/oneDNN)::

    [64 x 64]    M=1: 6/29   M=64: 12/34   M=512: 39/56
    [256 x 256]  M=1: 11/33  M=64: 74/86   M=512: 509/472
    [768 x 768]  M=1: 52/61  M=8: 151/109  M=64: 603/512

bf16 (where oneDNN has a bf16 path: AVX-512 BF16 / AMX) is another matter: `F.linear` has no MKL kernel for
it and calls oneDNN as well, re-blocking the weight each time, so packing wins from small sizes on (us per
call, bf16, `F.linear`/packed, torch 2.13, AMX machine, 1 thread, others running)::

    [32000 x 512] M=1: 3811/1952  M=16: 4532/1542  M=64: 6582/1917
    [1408 x 512]  M=1: 94/49      M=16: 100/49     M=64: 176/108
    [256 x 512]   M=1: 31/20      M=8: 32/19       M=64: 43/28
    [128 x 64]    M=1: 20/16      M=64: 21/18      [64 x 64] M=1: 4/19

so bf16 weights pack from `MIN_PACKED_WEIGHT_BF16` elements and calls from `MIN_PACKED_FLOPS_BF16`.
Results differ from MKL's only by float rounding (~1e-6 relative; bf16: one rounding of the output).
The model stays unmodified otherwise: each `nn.Linear` keeps its `weight` (state dicts, tied weights and
`.to()` still work) and only its class changes to `PackedLinear`, which re-packs whenever the weight tensor
is replaced or modified in place, and falls back to `F.linear` off CPU, with autograd, or with mixed dtypes.
The packed copy costs one more copy of every linear weight in host memory.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedq.worker.engine.cpu.host_memory import keep_freed_memory

log = logging.getLogger(__name__)



def _packable_dtypes() -> tuple[torch.dtype, ...]:
    """fp32 always; bf16 where oneDNN has a bf16 path on this CPU (AVX-512 BW/VL/DQ, or AVX-NE-CONVERT: an
    AVX2-only CPU raises on the bf16 reorder)."""
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


_PACKABLE = _packable_dtypes()
#: Smallest weight (in x out elements) worth a packed copy, and smallest product (rows x in x out) per call.
MIN_PACKED_WEIGHT = 512 * 512
MIN_PACKED_FLOPS = 1 << 21
#: The same for bf16 weights: `F.linear` has no MKL path for bf16 (it runs oneDNN too, re-blocking the weight
#: on every call), so almost every packed call is faster (module docstring).
MIN_PACKED_WEIGHT_BF16 = 128 * 128
MIN_PACKED_FLOPS_BF16 = 1 << 16


def _min_weight(dtype: torch.dtype) -> int:
    return MIN_PACKED_WEIGHT_BF16 if dtype == torch.bfloat16 else MIN_PACKED_WEIGHT


def _op_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")
        )
    except RuntimeError:  # an op namespace torch was built without
        return False


class PackedLinear(nn.Linear):
    """An `nn.Linear` that also holds its weight in oneDNN's blocked layout (set by `prepack_linears`)."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple[Any, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the packed weight behind (an opaque oneDNN tensor); it is rebuilt on use."""
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_packed_key", None)
        return state

    def _key(self) -> tuple[Any, ...]:
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # inference tensors have no version counter
            version = -1
        return (w.data_ptr(), w.dtype, w.device, w.shape, version)

    def _usable(self, x: torch.Tensor) -> bool:
        w, bias, dtype = self.weight, self.bias, self.weight.dtype
        return (
            x.dtype is dtype
            and dtype in _PACKABLE
            and x.device.type == "cpu"
            and w.device.type == "cpu"
            and (bias is None or bias.dtype is dtype)
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and x.numel() * w.shape[0] >= (MIN_PACKED_FLOPS_BF16 if dtype is torch.bfloat16 else MIN_PACKED_FLOPS)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._usable(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def plus(self, x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """`self(x) + add` for a bias-free layer and an `add` [out] of the weight's dtype. In bf16 / fp16 the
        sum is oneDNN's epilogue: one rounding of the fp32 accumulator plus `add` instead of two (the rounded
        product, then the rounded sum) and no second pass over [rows, out] (a seq2seq LM head's
        `final_logits_bias`: ~5% of a bf16 Marian beam step at 1,024 rows x 58,101 words). fp32 keeps the
        model's two operations (exactness)."""
        half = self.weight.dtype in (torch.bfloat16, torch.float16)
        if not half or self.bias is not None or add.dtype is not self.weight.dtype or not self._usable(x):
            return self(x).add_(add)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), add, "none", [], "")

    def _packed_weight(self) -> torch.Tensor:
        key = self._key()
        if self._packed is None or self._packed_key != key:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 64)
            self._packed_key = key
        return self._packed


def prepack_linears(model: nn.Module, min_weight: int | None = None) -> int:
    """Switch every plain `nn.Linear` of a CPU model with at least `min_weight` weight elements (default:
    `MIN_PACKED_WEIGHT`, `MIN_PACKED_WEIGHT_BF16` for bf16 weights) to `PackedLinear`; returns how many
    were switched.

    Does nothing (returns 0) when the model is not on CPU or torch lacks the oneDNN op."""
    if not _op_available():
        return 0
    count = 0
    for module in model.modules():
        weight = module.weight if type(module) is nn.Linear else None
        if (weight is not None and weight.device.type == "cpu" and weight.dtype in _PACKABLE
                and weight.numel() >= (_min_weight(weight.dtype) if min_weight is None else min_weight)):
            module.__class__ = PackedLinear
            count += 1
    if count:
        log.info("%s: %d linear layers use pre-packed oneDNN weights", type(model).__name__, count)
    return count


def prepare_for_host(model: nn.Module, prepack: bool) -> None:
    """What every engine does with its model first: the allocator settings (worker/engine/cpu/host_memory.py)
    and, when `prepack` (`EngineConfig.cpu_prepack_linear`), the pre-packed linear layers."""
    keep_freed_memory()
    if prepack:
        prepack_linears(model)


def unpack_linears(model: nn.Module) -> None:
    """Undo `prepack_linears` (drops the packed copies)."""
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__class__ = nn.Linear  # type: ignore[assignment]
            module.__dict__.pop("_packed", None)
            module.__dict__.pop("_packed_key", None)
