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
- for classification, `keep_first_tokens`: a forward hook on the encoder stack that keeps each segment's first
  token, so the unmodified pooler and head ("[CLS]", "<s>", DistilBERT's first token) see B one-token rows.

Positions (`LAYOUTS`): BERT and DistilBERT count from 0; RoBERTa-family embeddings count from padding_idx + 1
and leave pad tokens at padding_idx (`create_position_ids_from_input_ids`): the same rules, per segment.

Which models pack (`unsupported_reason`): model types in `LAYOUTS` (embeddings and heads checked against
transformers' own outputs in tests/test_encoder_packing.py), whose class supports the attention interface
(`_supports_attention_backend`, `_can_set_attn_implementation`), as plain encoders (no decoder, no
cross-attention). Any other model runs the padded path (DeBERTa-v2: its disentangled attention has no hook).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import chain
from typing import Any

import torch

from worker.engine.varlen_attention import SEGMENTS_KWARG, VARLEN_ATTENTION, Segments, register_varlen_attention

PACKED_INPUTS = ("input_ids", "token_type_ids")  # tokenizer outputs that are packed; attention_mask is not


class PositionRule(Enum):
    FROM_ZERO = "from_zero"  # BERT, DistilBERT: 0, 1, 2, ...
    AFTER_PADDING = "after_padding"  # RoBERTa family: padding_idx + 1, ...; pad tokens stay at padding_idx


@dataclass(frozen=True)
class EncoderLayout:
    """Where the per-architecture facts live: the base model's layer stack and its position rule."""

    encoder: str  # attribute of `model.base_model` whose output is the last hidden state [1, T, H]
    positions: PositionRule


LAYOUTS = {
    "bert": EncoderLayout("encoder", PositionRule.FROM_ZERO),
    "distilbert": EncoderLayout("transformer", PositionRule.FROM_ZERO),
    "roberta": EncoderLayout("encoder", PositionRule.AFTER_PADDING),
    "xlm-roberta": EncoderLayout("encoder", PositionRule.AFTER_PADDING),
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


def keep_first_tokens(model: Any, layout: EncoderLayout) -> Any:
    """Hook the encoder stack so that a packed forward's last hidden state becomes each segment's first token.

    [1, T, H] -> [B, 1, H]: the pooler/head of the unmodified model then reads row 0 of B "sequences".
    Unpacked forwards pass through untouched. Idempotent per model (a second executor on the same model must
    not cut twice). Returns the hook handle."""
    encoder = getattr(model.base_model, layout.encoder)
    if encoder in _FIRST_TOKEN_HOOKS:
        return _FIRST_TOKEN_HOOKS[encoder]

    def first_tokens(_module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        segments: Segments | None = kwargs.get(SEGMENTS_KWARG)
        if segments is not None:
            hidden = output.last_hidden_state
            output.last_hidden_state = hidden[0, list(segments.starts)].unsqueeze(1)
        return output

    handle = _FIRST_TOKEN_HOOKS[encoder] = encoder.register_forward_hook(first_tokens, with_kwargs=True)
    return handle


_FIRST_TOKEN_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()
