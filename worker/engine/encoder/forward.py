"""One encoder forward per step for classify and extractive QA: packed when the model can, padded otherwise.

`EncoderForward` keeps the two paths out of the executors::

                packed (encoder/packing.py)                    padded (batching.pad_batch)
    pick        pick_packed: sum of lengths <= budget           pick_batch: rows * longest <= budget
    forward     input_ids [1, sum L], attention per segment     input_ids [B, max L] + attention mask
    logits      [B, labels] (FirstTokenPooling hooks)           [B, labels] (the model's own pooling)
    per token   [1, T] split per segment                        [B, max L] cut to each row's real columns

A model packs only if it has a packing layout (`unsupported_reason`) AND passes the load-time self-check
(packing_check.py: a probe packed in one forward against the model's own forward of each input alone);
otherwise it runs padded, and one log line says why. `path` and `path_reason` tell the executors' stats which path
runs (`path`: "packed" | "padded") and why not packed (`path_reason`).

A step's batch runs as one or more forwards (`chunks`) of at most `forward_tokens` token rows each (an input
never splits): on CPU, a forward's widest activation -- the feed-forward's [T, intermediate] -- stays below
glibc's largest mmap threshold (host_memory.py), so it is served from the reused heap instead of fresh pages
faulted in again at every forward. Measured on the 2-core AMX machine (one thread, BERT-base layer without
attention, us per token): bf16 15.2 at 5,400 tokens against 20.8 at 8,972 (the GELU alone 1.4 against 4.7),
fp32 76 at 2,600 against 82 at 8,972; a whole 12-layer W3 forward of 64 texts (8,972 tokens), bf16, one
thread: 2.43 s CPU in forwards of <= 5,460 tokens against 2.73 s in one. Smaller forwards do not pay:
1,024 tokens cost 16% more than 5,460. Budgets above `forward_tokens` (e.g. W3's 8,192) therefore cost
nothing extra, and inputs in a step still finish together. (On cores shared with other busy processes,
every extra forward's parallel regions wait for descheduled threads: there, 2 threads ran slower than 1
whichever the cut.)

Counters (cumulative, for the executors' stats): `computed_tokens`, the token rows that went through the
linear layers, and `padded_tokens`, how many of them were padding (0 on the packed path).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

import numpy as np
import torch

from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel
from pagedq.worker.engine.cpu.host_memory import _MMAP_THRESHOLD_MAX
from pagedq.worker.engine.cpu.quantization import check_dtype
from pagedq.worker.engine.encoder.packing import (
    EncoderLayout,
    FirstTokenPooling,
    enable_packing,
    pack,
    unsupported_reason,
)
from pagedq.worker.engine.encoder.packing_check import probe_encodings, relative_error, served_outputs, tolerance
from pagedq.worker.engine.encoder.varlen_attention import SEGMENTS_KWARG, Segments, packed_forward
from pagedq.worker.engine.tasks.batching import pad_batch, pick_batch, pick_packed, unpadded_columns

log = logging.getLogger(__name__)

T = TypeVar("T")
Encoding = dict[str, list[int]]  # one input's token-id lists by model input name (unpadded)

#: A forward's widest activation stays below this many bytes on CPU (glibc's largest mmap threshold, less a page).
CPU_ACTIVATION_BYTES = _MMAP_THRESHOLD_MAX - 4096
#: ... but a forward may always hold this many token rows (wide models: per-forward overhead).
MIN_FORWARD_TOKENS = 512


def forward_token_limit(model: torch.nn.Module, device: torch.device) -> int | None:
    """Most token rows of one forward on `device` (None: no limit): on CPU, as many as keep the widest linear
    layer's output ([T, out_features] in the weights' dtype) under `CPU_ACTIVATION_BYTES`."""
    if device.type != "cpu":
        return None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        return None
    row_bytes = max(m.out_features * m.weight.element_size() for m in linears)
    return max(MIN_FORWARD_TOKENS, CPU_ACTIVATION_BYTES // row_bytes)


class EncoderForward:
    """Batched forwards of one encoder model; the engine thread's only way to run that model."""

    def __init__(self, loaded: LoadedModel, *, pooled: bool, packing: bool | None = None) -> None:
        """`pooled`: the head reads one token per input (classification); else outputs are per token (QA).
        `packing`: None packs when the model allows it and passes the self-check, True requires both (else
        ValueError), False keeps the padded path."""
        self.loaded, self.pooled = loaded, pooled
        self.layout: EncoderLayout | None = None
        self.forward_tokens = forward_token_limit(loaded.model, torch.device(loaded.device))
        self.counters = {"computed_tokens": 0, "padded_tokens": 0}
        reason = unsupported_reason(loaded.model) if packing is not False else "packing turned off"
        if packing and reason:
            raise ValueError(f"{loaded.spec.name}: cannot pack inputs: {reason}")
        if reason is None:
            reason = self._enable_checked_packing()
            if reason is not None:
                if packing:
                    raise ValueError(f"{loaded.spec.name}: cannot pack inputs: {reason}")
                log.warning("%s runs padded batches: %s", loaded.spec.name, reason)
        else:
            log.info("%s runs padded batches: %s", loaded.spec.name, reason)
        self.path_reason = reason or ""
        self.counters = {"computed_tokens": 0, "padded_tokens": 0}  # the probe is not counted

    @property
    def packed(self) -> bool:
        return self.layout is not None

    @property
    def path(self) -> str:
        return "packed" if self.packed else "padded"

    def pick(
        self, candidates: Sequence[tuple[EngineRequest, T]], length: Callable[[T], int], config: EngineConfig
    ) -> list[tuple[EngineRequest, T]]:
        """This step's batch under `config`'s token budget and request cap (see batching.py)."""
        choose = pick_packed if self.packed else pick_batch
        return choose(candidates, length, config.max_batch_tokens, config.max_running_requests)

    def chunks(self, encodings: Sequence[Encoding]) -> list[Sequence[Encoding]]:
        """`encodings` in order, cut into forwards of at most `forward_tokens` token rows each (packed: the sum
        of lengths; padded: rows x longest); an input longer than that runs alone."""
        limit = self.forward_tokens
        if limit is None:
            return [encodings]
        chunks: list[Sequence[Encoding]] = []
        current: list[Encoding] = []
        used = longest = 0
        for enc in encodings:
            n = len(enc["input_ids"])
            if current and (used + n if self.packed else (len(current) + 1) * max(longest, n)) > limit:
                chunks.append(current)
                current, used, longest = [], 0, 0
            current.append(enc)
            used, longest = used + n, max(longest, n)
        chunks.append(current)
        return chunks

    def logits(self, encodings: Sequence[Encoding]) -> torch.Tensor:
        """A classifier's forward(s) (`chunks`): float32 logits [len(encodings), num_labels] on the CPU."""
        return torch.cat([self._run(chunk)[0].logits.float().cpu() for chunk in self.chunks(encodings)])

    def token_outputs(self, encodings: Sequence[Encoding], names: Sequence[str]) -> list[list[np.ndarray]]:
        """Forward(s) (`chunks`); per input, the named per-token outputs (e.g. start/end logits) over its real
        tokens, float32 numpy arrays in the order of `names`."""
        results: list[list[np.ndarray]] = []
        for chunk in self.chunks(encodings):
            output, segments = self._run(chunk)
            tensors = [output[name].float().cpu() for name in names]
            if segments is not None:
                per_name = [segments.split(t[0]) for t in tensors]
            else:
                tokenizer, lengths = self.loaded.tokenizer, [len(enc["input_ids"]) for enc in chunk]
                per_name = [
                    [t[row, unpadded_columns(t.shape[1], n, tokenizer)] for row, n in enumerate(lengths)]
                    for t in tensors
                ]
            results.extend([x.numpy() for x in rows] for rows in zip(*per_name, strict=True))
        return results

    def _enable_checked_packing(self) -> str | None:
        """Switch the model to packed forwards if the self-check passes (None), else leave it as it was and
        return why not (see packing_check.py)."""
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        probe = probe_encodings(tokenizer, getattr(model.config, "max_position_embeddings", None))
        reference, names = [], None
        with torch.inference_mode():
            for encoding in probe:  # the model's own forward, before the swap: one input alone
                output = model(**pad_batch([encoding], tokenizer, self.loaded.device))
                names = names or served_outputs(output, self.pooled)
                reference.append([output[name][0].float().cpu() for name in names])
        assert names, "the model returns no logits to compare"
        original = model.config._attn_implementation
        self.layout = enable_packing(model)
        if self.pooled:
            FirstTokenPooling.install(model, self.layout)
        try:
            packed = self._packed_probe(probe, names)
            error, failure = relative_error(reference, packed), ""
        except Exception as exc:  # noqa: BLE001 - a packed forward that raises is refused like a wrong one
            error, failure = float("inf"), f" ({type(exc).__name__}: {exc})"
        limit = tolerance(check_dtype(model))  # the weights' dtype now (a caller may have cast the model)
        if error <= limit:
            return None
        self.layout = None
        FirstTokenPooling.uninstall(model)
        model.set_attn_implementation(original)
        return (f"self-check: packed outputs differ from the model's own forward by {error:.3g} relative "
                f"(tolerance {limit:g}){failure}")

    def _packed_probe(self, probe: Sequence[Encoding], names: Sequence[str]) -> list[list[torch.Tensor]]:
        if self.pooled:
            return [[row] for row in self.logits(probe)]
        return [[torch.from_numpy(x) for x in outputs] for outputs in self.token_outputs(probe, names)]

    def _run(self, encodings: Sequence[Encoding]) -> tuple[Any, Segments | None]:
        """The model's output, and the packing it ran with (None: padded)."""
        model, real = self.loaded.model, sum(len(enc["input_ids"]) for enc in encodings)
        segments = None
        if self.layout is not None:
            inputs = pack(encodings, self.layout, model.config.pad_token_id, self.loaded.device)
            segments, computed = inputs[SEGMENTS_KWARG], real
        else:
            inputs = pad_batch(encodings, self.loaded.tokenizer, self.loaded.device)
            computed = inputs["input_ids"].numel()
        self.counters["computed_tokens"] += computed
        self.counters["padded_tokens"] += computed - real
        with torch.inference_mode(), packed_forward() if segments is not None else nullcontext():
            return model(**inputs), segments
