"""What the paged seq2seq engine must know about each encoder-decoder architecture, and nothing more.

Verified architectures (`PAGED_MODEL_TYPES`, each against `generate` token for token in
tests/worker/engine/seq2seq/: test_seq2seq_engine.py, test_seq2seq_families.py): Marian, BART, mBART, M2M100
(also NLLB), Pegasus, Blenderbot, Blenderbot-small, PLBart, T5 and mT5. Anything else runs on the batched-`generate`
fallback (`generate_fallback.py`); `NOT_PAGED` says why for the families we know. `check_model` decides
before the engine touches the model: it only reads attributes, and raises nothing but
`UnsupportedArchitecture`.

Positions. Marian, BART, mBART and M2M100 compute decoder positions as `arange + cache.get_seq_length()`
and encoder positions as `arange(T)`: wrong for a packed batch. Hooks on each stack's `embed_positions`
apply the engine's per-sequence positions p (`PositionTable`):

    Marian (sinusoidal nn.Embedding)   pre-hook passes position_ids=p       -> weight[p]
    BART / mBART / PLBart (offset 2)   pre-hook passes position_ids=p       -> weight[p + 2]
    Pegasus (sinusoidal nn.Embedding)  pre-hook passes position_ids=p       -> weight[p]
    Blenderbot(-small) (learned)       pre-hook passes position_ids=p       -> weight[p]
    M2M100 / NLLB (sinusoidal buffer)  hook replaces the output             -> weights[padding_idx + 1 + p]
                                       (a pad token: weights[padding_idx])

T5 and mT5 (the same modelling code; mT5 is T5 v1.1: gated-gelu, untied head) have no absolute positions:
one relative bias owned by each stack's first layer (see `seq2seq.attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pagedq.worker.engine.seq2seq.attention import KVPool

T5_TYPES = ("t5", "mt5")
BART_TYPES = ("marian", "bart", "mbart", "m2m_100", "pegasus", "blenderbot", "blenderbot-small", "plbart")
PAGED_MODEL_TYPES = BART_TYPES + T5_TYPES

#: why known encoder-decoder families stay on the `generate` fallback
NOT_PAGED = {
    "umt5": "UMT5 gives every layer its own relative attention bias; the paged decoder applies layer 0's",
    "longt5": "LongT5's encoder uses local / transient-global attention, not full attention",
    "prophetnet": "ProphetNet's decoder predicts n-gram streams with its own attention (no attention interface)",
    "fsmt": "FSMT's attention does not go through transformers' attention interface",
    "nllb-moe": "NLLB-MoE's expert layers are not verified on the paged engine",
}

#: `embed_positions` modules whose `forward` takes `position_ids` (Marian, the BART family)
POSITION_IDS_EMBEDDINGS = (
    "MarianSinusoidalPositionalEmbedding", "BartLearnedPositionalEmbedding", "MBartLearnedPositionalEmbedding",
    "PegasusSinusoidalPositionalEmbedding", "BlenderbotLearnedPositionalEmbedding",
    "BlenderbotSmallLearnedPositionalEmbedding", "PLBartLearnedPositionalEmbedding",
)  # fmt: skip
M2M100_EMBEDDING = "M2M100SinusoidalPositionalEmbedding"
_T5_FIELDS = ("num_decoder_layers", "num_heads", "d_kv", "d_model")
_BART_FIELDS = ("decoder_layers", "decoder_attention_heads", "d_model", "max_position_embeddings")


class UnsupportedArchitecture(ValueError):
    """The model cannot run on the paged seq2seq engine (use the `generate` fallback)."""


@dataclass(frozen=True)
class DecoderShape:
    """What the KV pool needs: decoder layers, heads and head size (cross and self attention agree)."""

    num_layers: int
    num_heads: int
    head_dim: int
    max_positions: int | None  # learned/sinusoidal decoder positions; None for T5

    @classmethod
    def of(cls, model: Any) -> DecoderShape:
        config = model.config
        if config.model_type in T5_TYPES:
            return cls(config.num_decoder_layers, config.num_heads, config.d_kv, None)
        heads = config.decoder_attention_heads
        return cls(config.decoder_layers, heads, config.d_model // heads, config.max_position_embeddings)

    def pool(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        compute_dtype: torch.dtype | None = None,
    ) -> KVPool:
        return KVPool(
            self.num_layers, num_blocks, block_size, self.num_heads, self.head_dim, dtype, device, compute_dtype
        )


def check_model(model: Any) -> None:
    """Raise `UnsupportedArchitecture` unless the paged engine can run `model` unmodified.

    Runs before anything else touches the model: it reads attributes only (never a config field that a
    family may lack), so an architecture the engine does not know fails here, with a reason, and nowhere
    else."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or not getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitecture(f"{name} is not an encoder-decoder model")
    model_type = getattr(config, "model_type", None)
    if model_type not in PAGED_MODEL_TYPES:
        why = NOT_PAGED.get(str(model_type), f"not one of the paged architectures {PAGED_MODEL_TYPES}")
        raise UnsupportedArchitecture(f"{name} ({model_type}): {why}")
    fields = _T5_FIELDS if model_type in T5_TYPES else _BART_FIELDS
    missing = [f for f in fields if not isinstance(getattr(config, f, None), int) or getattr(config, f) < 1]
    if missing:
        raise UnsupportedArchitecture(f"{name} ({model_type}) config lacks positive {missing}")
    if model_type in BART_TYPES and config.d_model % config.decoder_attention_heads:
        raise UnsupportedArchitecture(f"{name}: d_model is not a multiple of decoder_attention_heads")
    for part in ("get_encoder", "get_decoder", "get_output_embeddings"):
        if not callable(getattr(model, part, None)):
            raise UnsupportedArchitecture(f"{name} has no {part}()")
    if model_type in BART_TYPES:
        for stack in (model.get_encoder(), model.get_decoder()):
            kind = type(getattr(stack, "embed_positions", None)).__name__
            if kind not in (*POSITION_IDS_EMBEDDINGS, M2M100_EMBEDDING):
                raise UnsupportedArchitecture(f"{name}: unknown position embedding {kind}")


class PositionTable:
    """How one `embed_positions` module gets the engine's positions (module docstring).

    Marian, BART and mBART accept `position_ids`: a forward pre-hook passes ours (their own offset
    still applies). M2M100 takes none: its output is replaced by the rows of its table."""

    def __init__(self, module: Any, pad_token_id: int | None) -> None:
        kind = type(module).__name__
        self.module = module
        self.pad_token_id = pad_token_id
        self.pad_row: int | None = None
        if kind == M2M100_EMBEDDING:
            self.takes_position_ids = False
            self.offset, self.pad_row = int(module.padding_idx) + 1, int(module.padding_idx)
        elif kind in POSITION_IDS_EMBEDDINGS:
            self.takes_position_ids = True
            self.offset = 0
        else:
            raise UnsupportedArchitecture(f"unknown position embedding {kind}")

    def positions(self, tokens: Sequence[int], start: int, end: int) -> list[int]:
        """What the hook needs for tokens[start:end] of one sequence: positions, or M2M100 table rows.

        M2M100 gives a pad token the zero row `padding_idx`; later tokens keep `offset + i`, as in
        `generate`'s incremental decoding (which counts cached tokens, pads included)."""
        rows = list(range(start + self.offset, end + self.offset))
        if self.pad_row is not None:
            rows = [self.pad_row if tokens[start + i] == self.pad_token_id else r for i, r in enumerate(rows)]
        return rows

    def lookup(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """M2M100: embeddings of table `rows` [T], shaped like the module's own output `like`."""
        weight = self.module.weights
        if int(rows.max()) >= weight.shape[0]:
            raise ValueError(f"position {int(rows.max())} is beyond the model's {weight.shape[0]} positions")
        return F.embedding(rows, weight).view_as(like).to(like.dtype)


class PositionHooks:
    """Hooks on the encoder's and decoder's `embed_positions` that apply the engine's positions.

    Set `rows["encoder"]` / `rows["decoder"]` before a forward and reset them after: while unset, the
    hooks change nothing (the model may serve `generate` for a fallback request in between)."""

    def __init__(self, model: Any) -> None:
        pad = model.config.pad_token_id
        self.tables: dict[str, PositionTable] = {}
        self.rows: dict[str, torch.Tensor | None] = {"encoder": None, "decoder": None}
        self._handles: list[Any] = []
        for name, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
            module = getattr(stack, "embed_positions", None)
            if module is None:
                continue  # T5: relative positions only
            table = self.tables[name] = PositionTable(module, pad)
            if table.takes_position_ids:
                handle = module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._hook(name, table))
            self._handles.append(handle)

    def _pre_hook(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            rows = self.rows[name]
            return None if rows is None else (args, {**kwargs, "position_ids": rows})

        return hook

    def _hook(self, name: str, table: PositionTable) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
            rows = self.rows[name]
            return None if rows is None else table.lookup(rows, output)

        return hook

    def positions(self, stack: str, tokens: Sequence[int], start: int, end: int) -> list[int]:
        table = self.tables.get(stack)
        return table.positions(tokens, start, end) if table is not None else []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def t5_decoder_bias_owner(model: Any) -> Any:
    """T5 / mT5: the decoder's first self-attention, which owns `relative_attention_bias`; None otherwise."""
    if model.config.model_type not in T5_TYPES:
        return None
    return model.get_decoder().block[0].layer[0].SelfAttention


def max_encoder_pass_tokens(model: Any) -> int | None:
    """T5 builds a [heads, T, T] bias over a whole packed encoder pass: keep its passes short."""
    return 512 if model.config.model_type in T5_TYPES else None
