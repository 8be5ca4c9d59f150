"""Packed ("varlen") encoder forwards: every input of a step in ONE row, no padding in the linear layers.

    inputs A(5) B(3) C(4)  ->  input_ids     [a a a a a b b b c c c c]     shape [1, 12]
                               position_ids  [0 1 2 3 4 0 1 2 0 1 2 3]     restart per input
                               segments      starts (0, 5, 8), lengths (5, 3, 4)
    every attention layer: A attends to A only, B to B, C to C (varlen_attention.py)

The model stays unmodified; what the engine sets on it, once, when an executor takes it over:
- `model.set_attn_implementation(VARLEN_ATTENTION)`: its layers call `varlen_attention`, which reads the
  step's `Segments` from the extra model keyword `SEGMENTS_KWARG` (transformers hands extra keywords down to
  every attention call). Called WITHOUT segments -- a pipeline, the padded fallback -- it is transformers' own
  SDPA attention with SDPA's masks (registered under the same name), so the model keeps working for them;
- for classification, `FirstTokenPooling`: hooks that keep each segment's first token after the last layer's
  attention, so that layer's feed-forward, the pooler and the head ("[CLS]", "<s>", DistilBERT's first
  token) run on B one-token rows.

Positions (`LAYOUTS`): BERT, DistilBERT and ELECTRA count from 0; RoBERTa-family embeddings count from padding_idx + 1
and leave pad tokens at padding_idx (`create_position_ids_from_input_ids`): the same rules, per segment.

Which models pack (`unsupported_reason`): model types in `LAYOUTS` (embeddings and heads checked against
transformers' own outputs in tests/worker/engine/encoder/: test_encoder_packing.py, test_encoder_families.py),
whose class supports the attention interface (`_supports_attention_backend`, `_can_set_attn_implementation`), as plain
encoders (no decoder, no cross-attention) -- and then only if the load-time self-check passes
(packing_check.py, run by `forward.EncoderForward`). Any other model runs the padded path: DeBERTa-v2,
MPNet and RoFormer (relative or rotary positions; no attention interface), ALBERT (one layer shared by every
depth: the first-token cut would run at each), ModernBERT (rotary positions, local attention windows).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import chain
from typing import Any

import torch

from pagedq.worker.engine.encoder.varlen_attention import (
    SEGMENTS_KWARG,
    VARLEN_ATTENTION,
    Segments,
    register_varlen_attention,
)

PACKED_INPUTS = ("input_ids", "token_type_ids")  # tokenizer outputs that are packed; attention_mask is not


class PositionRule(Enum):
    FROM_ZERO = "from_zero"  # BERT, DistilBERT: 0, 1, 2, ...
    AFTER_PADDING = "after_padding"  # RoBERTa family: padding_idx + 1, ...; pad tokens stay at padding_idx


@dataclass(frozen=True)
class EncoderLayout:
    """Where the per-architecture facts live (module names relative to `model.base_model`)."""

    encoder: str  # the layer stack; its output's `last_hidden_state` is [1, T, H]
    post_attention: str  # in the stack's last layer: output = hidden state after attention and its residual,
    #                      the feed-forward's only input (what classification may cut to first tokens)
    positions: PositionRule
    layers: str = "layer"  # the stack's ModuleList of layers


LAYOUTS = {
    "bert": EncoderLayout("encoder", "attention", PositionRule.FROM_ZERO),
    "electra": EncoderLayout("encoder", "attention", PositionRule.FROM_ZERO),
    "distilbert": EncoderLayout("transformer", "sa_layer_norm", PositionRule.FROM_ZERO),
    "roberta": EncoderLayout("encoder", "attention", PositionRule.AFTER_PADDING),
    "xlm-roberta": EncoderLayout("encoder", "attention", PositionRule.AFTER_PADDING),
}


def unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot run packed (None: it can). Read from the class and config, nothing is changed."""
    config = model.config
    if not model.is_backend_compatible() or not model._can_set_attn_implementation():
        return f"{type(model).__name__} does not take an attention implementation"
    if config.model_type not in LAYOUTS:
        return f"model type {config.model_type!r} has no packing layout"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "packing is for plain encoders (this one is configured as a decoder)"
    if model.training:
        return "the model is in training mode (dropout would differ per segment layout)"
    return None


def enable_packing(model: Any) -> EncoderLayout:
    """Switch `model`'s attention to `varlen_attention`. The caller owns the model: this changes its config
    (and that of any model built from the same config object)."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"cannot pack inputs for this model: {reason}")
    register_varlen_attention()
    model.set_attn_implementation(VARLEN_ATTENTION)
    return LAYOUTS[model.config.model_type]


def pack(
    encodings: Sequence[dict[str, list[int]]], layout: EncoderLayout, pad_token_id: int | None, device: Any
) -> dict[str, Any]:
    """Model keywords for ONE packed forward over `encodings` (token-id lists of one input each)."""
    segments = Segments.from_lengths([len(enc["input_ids"]) for enc in encodings], device)
    inputs: dict[str, Any] = {
        name: torch.tensor(list(chain.from_iterable(enc[name] for enc in encodings)), dtype=torch.long)
        for name in PACKED_INPUTS
        if name in encodings[0]
    }
    inputs["position_ids"] = position_ids(inputs["input_ids"], segments, layout.positions, pad_token_id)
    inputs = {name: tensor.to(device)[None] for name, tensor in inputs.items()}
    inputs[SEGMENTS_KWARG] = segments
    return inputs


def position_ids(ids: torch.Tensor, segments: Segments, rule: PositionRule, pad_token_id: int | None) -> torch.Tensor:
    """Positions [T] restarting at each segment, as the model computes them for one unpadded input."""
    lengths = torch.tensor(segments.lengths)
    if rule is PositionRule.FROM_ZERO:
        return torch.arange(len(ids)) - torch.tensor(segments.starts).repeat_interleave(lengths)
    assert pad_token_id is not None, "RoBERTa-family positions count from the pad token id"
    real = ids.ne(pad_token_id).long()
    seen = real.cumsum(0)  # real tokens up to and including each token, across segments
    before = (seen - real)[list(segments.starts)]  # real tokens before each segment
    return (seen - before.repeat_interleave(lengths)) * real + pad_token_id


class FirstTokenPooling:
    """Hooks that make a packed classifier forward compute only what its head reads: each segment's first token.

    - after the LAST layer's attention (`layout.post_attention`, residual included), rows are cut to each
      segment's first token, [1, T, H] -> [1, B, H]: that layer's feed-forward runs on B rows instead of T
      (its keys and values needed every token; nothing after the cut does);
    - the encoder's output [1, B, H] becomes [B, 1, H]: the unmodified pooler and head ("[CLS]", "<s>",
      DistilBERT's first token) read row 0 of B one-token sequences.
    Unpacked forwards pass through untouched. A pre-hook takes the running forward's segments from the
    encoder's keywords (the post-attention module, a LayerNorm in DistilBERT, gets none); the engine thread
    is the model's only caller, so one forward runs at a time. Use `install` (once per model).
    """

    def __init__(self, model: Any, layout: EncoderLayout) -> None:
        self.segments: Segments | None = None
        encoder = getattr(model.base_model, layout.encoder)
        last = getattr(encoder, layout.layers)[-1].get_submodule(layout.post_attention)
        self.handles = [
            encoder.register_forward_pre_hook(self._start, with_kwargs=True),
            last.register_forward_hook(self._cut),
            encoder.register_forward_hook(self._finish),
        ]

    @classmethod
    def install(cls, model: Any, layout: EncoderLayout) -> FirstTokenPooling:
        """The model's pooling hooks, installed on first use (a second executor must not cut twice)."""
        if model not in _POOLING:
            _POOLING[model] = cls(model, layout)
        return _POOLING[model]

    @classmethod
    def uninstall(cls, model: Any) -> None:
        """Remove the model's pooling hooks (a model that failed the packing self-check runs padded)."""
        pooling = _POOLING.pop(model, None)
        for handle in pooling.handles if pooling is not None else ():
            handle.remove()

    def _start(self, _module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        self.segments = kwargs.get(SEGMENTS_KWARG)

    def _cut(self, _module: Any, _args: Any, output: Any) -> Any:
        if self.segments is None:
            return output
        starts = list(self.segments.starts)
        if isinstance(output, tuple):  # (hidden states, attention weights)
            return (output[0][:, starts], *output[1:])
        return output[:, starts]

    def _finish(self, _module: Any, _args: Any, output: Any) -> Any:
        if self.segments is not None:
            output.last_hidden_state = output.last_hidden_state.transpose(0, 1)
        return output


_POOLING: weakref.WeakKeyDictionary[torch.nn.Module, FirstTokenPooling] = weakref.WeakKeyDictionary()
