"""int8 linear layers on CPU: per-token activations x per-channel weights, int32 accumulation (W8A8).

`quantize_int8(model)` swaps a loaded fp32 transformers model's linear layers, in place, for `Int8Linear`:

    weight      int8 [out, in], symmetric per output channel: w ~= weight * weight_scale[out]
    activation  quantized on every call, symmetric per row (token): x ~= q * s[row], s = max|x[row]| / 127
    product     q @ weight^T in int32 (torch._int_mm: oneDNN's VNNI / AMX-int8 kernels), then
                y = acc * weight_scale * s + bias in fp32

Per-row (not per-tensor) activation scales make a row's result independent of the other rows of the batch:
a request gets the same output alone, padded, packed or batched with others, which the engine's load-time
self-checks (packed / paged forward against the model's own forward of one input) rely on; per-tensor
dynamic quantization (torch.ao's `quantize_dynamic`) changes every row with the batch's largest value.

Where `torch._int_mm` has no fast kernel (it needs AVX512-VNNI; AVX2-only CPUs get a naive loop, ~1000x
slower), the same arithmetic runs as an fp32 GEMM over the int8 values (`emulated`: the integer products and
their sums are exact in fp32 for in_features <= 1040, so results equal the int8 kernel's; above that they
differ by fp32 rounding, ~1e-7 relative). That path has fp32 speed and keeps an fp32 copy of the int8 weights:
it exists so an int8 registry entry still serves there, not to be fast.

Which layers: every `nn.Linear` (and transformers' GPT-2-style `Conv1D`) of the model's base model, except
  - the task head outside the base model (classifier, QA span head: a few columns, no speed to gain) and a
    pooler (one row per input);
  - the cross-attention key/value projections of an encoder-decoder's decoder: the paged seq2seq engine
    absorbs their weights into its attention (seq2seq_attention.py), so they stay fp32 in both the engine and
    the model's own forward;
  - the LM head (output embeddings) unless `lm_head=True` (the default: quantized; see `DEFAULT_LM_HEAD`).
Embeddings and norms stay fp32; activations between layers stay fp32. CPU only: `check_device` refuses others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: attribute set on a quantized model (its `QuantizationSummary`)
SUMMARY_ATTR = "pagedq_quantization"
#: quantize the LM head of generative models (measured: see tests/test_int8.py and the report)
DEFAULT_LM_HEAD = True
#: in_features up to which fp32 sums of int8 products are exact (1040 x 127 x 127 < 2**24)
EXACT_FP32_IN_FEATURES = 1040
_EPS = 1e-12  # scale floor: an all-zero row quantizes to zeros


def _int8_kernel_available() -> bool:
    """True where `torch._int_mm` runs oneDNN's int8 kernel on CPU: AVX512-VNNI (AMX-int8 CPUs have it)."""
    try:
        vnni = bool(torch.cpu._is_vnni_supported())  # torch's own gate for _int_mm (avx512_vnni)
    except (AttributeError, RuntimeError):
        vnni = False
    return vnni and torch.backends.mkldnn.is_available()


INT8_KERNEL = _int8_kernel_available()


def int8_kernel_active() -> bool:
    """The fast int8 kernel runs now (the CPU has it and oneDNN is not turned off by `torch.backends.mkldnn`)."""
    return INT8_KERNEL and torch._C._get_mkldnn_enabled()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (int8 [out, in], fp32 scale [out]), symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=_EPS) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and per-token int8 activations (module docstring).

    `weight` is the int8 tensor [out, in] (as bitsandbytes' int8 layers have it: transformers code that casts
    activations to a layer's weight dtype skips int8 weights), `weight_scale` its per-channel fp32 scale,
    `bias` fp32. Inputs of any float dtype; the result has the input's dtype (computed in fp32)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, scale = quantize_weight(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._emulated: torch.Tensor | None = None  # fp32 copy of `weight` for the emulated path, built on use

    @classmethod
    def from_float(cls, module: nn.Module) -> Int8Linear:
        """From an `nn.Linear` (weight [out, in]) or a transformers `Conv1D` (weight [in, out])."""
        weight = module.weight
        if _is_conv1d(module):
            weight = weight.t()
        return cls(weight, module.bias)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_emulated"] = None
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32:
            rows = rows.float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=_EPS).div_(127.0)  # [M, 1]
        q = torch.round(rows / scale)  # |q| <= 127: the row's largest value maps to +-127
        if x.device.type == "cpu" and int8_kernel_active():
            acc = torch._int_mm(q.to(torch.int8), self.weight.t())  # int32 [M, out]
        else:
            acc = F.linear(q, self._fp32_weight())  # the same integers, summed in fp32
        y = acc * self.weight_scale  # -> fp32
        y.mul_(scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def _fp32_weight(self) -> torch.Tensor:
        w = self.weight
        if self._emulated is None or self._emulated.device != w.device:
            self._emulated = w.to(torch.float32)
        return self._emulated


@dataclass(frozen=True)
class QuantizationSummary:
    """What `quantize_int8` did, for logs and stats."""

    quantized: int  # linear layers now Int8Linear
    kept: int  # linear layers left fp32 (heads, cross-attention K/V, ...)
    int8_params: int  # weight elements now int8
    fp32_params: int  # weight elements of the kept linear layers
    kernel: str  # "onednn-int8" (VNNI/AMX) or "emulated-fp32"
    lm_head: bool

    def describe(self) -> str:
        return (
            f"int8 W8A8 (per-channel weights, per-token activations): {self.quantized} linear layers "
            f"({self.int8_params / 1e6:.1f}M weights) int8 via {self.kernel}, {self.kept} kept fp32 "
            f"({self.fp32_params / 1e6:.1f}M), LM head {'int8' if self.lm_head else 'fp32'}"
        )


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
    config = getattr(model, "config", None)
    get_decoder = getattr(model, "get_decoder", None)
    if getattr(config, "is_encoder_decoder", False) and callable(get_decoder):
        for module in get_decoder().modules():
            if getattr(module, "is_causal", True):
                continue  # self-attention (or not attention at all)
            for names in (("k_proj", "v_proj"), ("k", "v")):
                parts = [getattr(module, n, None) for n in names]
                if all(isinstance(p, nn.Module) and _is_linear(p) for p in parts):
                    kept |= {id(p) for p in parts}
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
                kept_params += child.weight.numel()
                continue
            check_device(child.weight.device)
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
        kernel="onednn-int8" if int8_kernel_active() else "emulated-fp32",
        lm_head=isinstance(head, Int8Linear),
    )
    setattr(model, SUMMARY_ATTR, summary)
    log.info("%s: %s", type(model).__name__, summary.describe())
    return model


def quantization_summary(model: Any) -> QuantizationSummary | None:
    """What `quantize_int8` did to `model`, or None if it was not quantized."""
    summary = getattr(model, SUMMARY_ATTR, None)
    return summary if isinstance(summary, QuantizationSummary) else None
