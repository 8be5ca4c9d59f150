"""Load-time self-check of packed encoder forwards: exact or not packed.

Packing (encoder/packing.py) swaps the model's attention and computes positions itself; a family whose
attention or positions work differently (relative positions, rotary, an offset, shared layers) would come
out silently wrong. So before an executor serves packed batches, `EncoderForward` runs this probe once::

    probe        PROBE_INPUTS tokenized: 3 inputs of different lengths, one a text pair (token types)
    reference    the model's own forward of each input alone, BEFORE the swap (its attention, no padding)
    packed       ONE packed forward of the three, after the swap (and, for classifiers, the pooling hooks)
    error        max |packed - reference| over the outputs the executor serves (classification logits;
                 QA start/end logits, every token), divided by max(1, max |reference|)

An error above `tolerance(dtype)` (or a packed forward that raises) means: restore the model's attention,
serve padded batches (the model's own forward with an attention mask, exact by construction) and say why.

Cost, at load time only: four forwards over ~100 tokens in all (each probe input twice), i.e. about
100 x 2 x params FLOPs. Measured on the 2-core development CPU while others ran on it, one thread: 7-16 ms
for the 2-layer x 64 test models, ~1 s for a BERT-base shape (12 x 768, fp32; ~17 GFLOP, so ~0.1 s on an idle
machine at the 190 GFLOP/s of the README's measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: probe inputs: (text, text pair or None), of different lengths so that segments restart mid-row
PROBE_INPUTS: tuple[tuple[str, str | None], ...] = (
    ("The tower was finished in 1889 and stayed the tallest building in the world for forty years.", None),
    ("Fine.", None),
    ("Who built it?", "Gustave Eiffel's company built the tower for the world fair in Paris."),
)
PROBE_MAX_TOKENS = 48  # per input; far below every model's position limit
#: largest relative error allowed: fp32 is exact up to summation order; half precision rounds per layer
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 1e-2}

Encoding = dict[str, list[int]]


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])


def probe_encodings(tokenizer: Any, max_positions: int | None) -> list[Encoding]:
    """The probe inputs as the executors tokenize them: token-id lists of the tokenizer's model inputs."""
    limit = min(PROBE_MAX_TOKENS, max_positions or PROBE_MAX_TOKENS)
    names = [n for n in tokenizer.model_input_names if n != "offset_mapping"]
    encodings = []
    for text, pair in PROBE_INPUTS:
        encoded = tokenizer(text, pair, truncation=True, max_length=limit)
        encodings.append({name: list(encoded[name]) for name in names if name in encoded})
    return encodings


def served_outputs(output: Any, pooled: bool) -> list[str]:
    """The output names an executor reads: `logits` for a classifier, every `*logits` per token otherwise."""
    if pooled:
        return ["logits"]
    return [name for name, value in output.items() if name.endswith("logits") and isinstance(value, torch.Tensor)]


def relative_error(reference: Sequence[Sequence[torch.Tensor]], packed: Sequence[Sequence[torch.Tensor]]) -> float:
    """max |packed - reference| / max(1, max |reference|), over every input and output (float32)."""
    worst, scale = 0.0, 1.0
    for ref_outputs, packed_outputs in zip(reference, packed, strict=True):
        for ref, got in zip(ref_outputs, packed_outputs, strict=True):
            ref, got = ref.float(), got.float()
            if ref.shape != got.shape:
                return float("inf")
            diff = (got - ref).abs()
            if not bool(diff.isfinite().all()):
                return float("inf")
            worst = max(worst, float(diff.max()))
            scale = max(scale, float(ref.abs().max()))
    return worst / scale
