"""Load the registry's models once per worker process, through the transformers Auto classes.

Called after the worker process has started (the threads pool never forks, so CUDA is safe to use).
A model entry's `source` is a hub id or a local directory saved with `save_pretrained`; both go through
`from_pretrained`, so real hub ids work wherever a network or a local cache exists.

`dtype = "int8"` (CPU only; refused on CUDA at load): the model loads in fp32, then its linear layers are
quantized in place (`pagedq.worker.engine.cpu.quantization.quantize_int8`); `LoadedModel.dtype` is float32, the
dtype of the activations every engine path computes in.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from pagedq.shared.registry import ModelSpec, Registry
from pagedq.worker.engine.core.executor import LoadedModel
from pagedq.worker.engine.cpu.quantization import check_device, quantization_summary, quantize_int8

log = logging.getLogger(__name__)

AUTO_CLASSES = {
    "sequence-classification": AutoModelForSequenceClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "seq2seq": AutoModelForSeq2SeqLM,
    "causal-lm": AutoModelForCausalLM,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str | None) -> torch.device:
    """`auto` (or None) is the first CUDA device when there is one, else the CPU."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later): oneDNN multiplies bf16 matrices there
    several times faster than fp32. Elsewhere (AVX2, AVX-512 without AMX) bf16 is emulated or barely
    faster, and fp32 is the better default."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """The dtype of the weights as loaded and of the activations.

    `auto`: bf16 on CUDA when the card supports it (else fp16); on CPU, bf16 where the CPU has AMX
    (`cpu_has_fast_bf16`; 2-4x fp32 there, with the accuracy the README states) and fp32 elsewhere. Set
    `float32` for scores equal to transformers' fp32 forward. `int8` is fp32 activations, its linear layers
    quantized after loading."""
    if spec.dtype == "int8":
        check_device(device)
        return torch.float32
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_tokenizer(spec: ModelSpec, registry: Registry) -> Any:
    """The model's tokenizer, as the engine loads it with the model (and the engine-core process's front end
    loads it alone, to decode token streams)."""
    return AutoTokenizer.from_pretrained(registry.resolve_source(spec), revision=spec.revision)


def load_model(spec: ModelSpec, registry: Registry, device: str | None = None) -> LoadedModel:
    source = registry.resolve_source(spec)
    target = resolve_device(spec.device or device)
    dtype = resolve_dtype(spec, target)
    assert spec.architecture is not None  # filled by ModelSpec's validator
    started = time.perf_counter()
    tokenizer = load_tokenizer(spec, registry)
    model = AUTO_CLASSES[spec.architecture].from_pretrained(source, revision=spec.revision, dtype=dtype)
    model.to(target).eval()
    if spec.dtype == "int8":
        quantize_int8(model)
    summary = quantization_summary(model)
    log.info("loaded %s (%s, %s) on %s as %s in %.1fs%s", spec.name, spec.architecture, source, target, dtype,
             time.perf_counter() - started, f"; {summary.describe()}" if summary else "")
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=target, dtype=dtype)
