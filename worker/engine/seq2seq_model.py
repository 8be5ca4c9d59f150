"""What the paged seq2seq engine must know about each encoder-decoder architecture, and nothing more.

Verified architectures (`PAGED_MODEL_TYPES`): Marian, BART, mBART, M2M100 (also NLLB), T5. Anything else
runs on the batched-`generate` fallback (`seq2seq_generate.py`).

Positions. Marian, BART, mBART and M2M100 compute decoder positions as `arange + cache.get_seq_length()`
and encoder positions as `arange(T)`: wrong for a packed batch. Hooks on each stack's `embed_positions`
apply the engine's per-sequence positions p (`PositionTable`):

    Marian (sinusoidal nn.Embedding)   pre-hook passes position_ids=p       -> weight[p]
    BART / mBART (learned, offset 2)   pre-hook passes position_ids=p       -> weight[p + 2]
    M2M100 / NLLB (sinusoidal buffer)  hook replaces the output             -> weights[padding_idx + 1 + p]
                                       (a pad token: weights[padding_idx])

T5 has no absolute positions (relative bias, see `seq2seq_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine.seq2seq_attention import KVPool

PAGED_MODEL_TYPES = ("marian", "bart", "mbart", "m2m_100", "t5")


class UnsupportedArchitecture(ValueError):
    """The model cannot run on the paged seq2seq engine (use the `generate` fallback)."""


@dataclass(frozen=True)
class DecoderShape:
    """What the KV pool needs: decoder layers, heads and head size (cross and self attention agree), and
    the width of the encoder output that cross-attention reads."""

    num_layers: int
    num_heads: int
    head_dim: int
    max_positions: int | None  # learned/sinusoidal decoder positions; None for T5
    encoder_dim: int

    @classmethod
    def of(cls, model: Any) -> DecoderShape:
        config = model.config
        if config.model_type == "t5":
            return cls(config.num_decoder_layers, config.num_heads, config.d_kv, None, config.d_model)
        heads = config.decoder_attention_heads
        return cls(
            config.decoder_layers, heads, config.d_model // heads, config.max_position_embeddings, config.d_model
        )

    def pool(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str) -> KVPool:
        return KVPool(self.num_layers, num_blocks, block_size, self.num_heads, self.head_dim, dtype, device,
                      self.encoder_dim)  # fmt: skip

    def encoder_rows_per_page(self, block_size: int) -> int:
        shape = (self.num_layers, block_size, self.num_heads, self.head_dim, self.encoder_dim)
        return KVPool.encoder_rows_per_page(*shape)


def check_model(model: Any) -> None:
    """Raise `UnsupportedArchitecture` unless the paged engine can run `model` unmodified."""
    config = model.config
    if not getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitecture(f"{type(model).__name__} is not an encoder-decoder model")
    if config.model_type not in PAGED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} ({config.model_type}) is not one of the paged architectures {PAGED_MODEL_TYPES}"
        )
    if config.model_type == "t5" and getattr(config, "num_heads", 0) * getattr(config, "d_kv", 0) == 0:
        raise UnsupportedArchitecture("T5 config without heads")


class PositionTable:
    """How one `embed_positions` module gets the engine's positions (module docstring).

    Marian, BART and mBART accept `position_ids`: a forward pre-hook passes ours (their own offset
    still applies). M2M100 takes none: its output is replaced by the rows of its table."""

    def __init__(self, module: Any, pad_token_id: int | None) -> None:
        kind = type(module).__name__
        self.module = module
        self.pad_token_id = pad_token_id
        self.pad_row: int | None = None
        if kind == "M2M100SinusoidalPositionalEmbedding":
            self.takes_position_ids = False
            self.offset, self.pad_row = int(module.padding_idx) + 1, int(module.padding_idx)
        elif kind in ("MarianSinusoidalPositionalEmbedding", "BartLearnedPositionalEmbedding",
                      "MBartLearnedPositionalEmbedding"):  # fmt: skip
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
    """T5: the decoder's first self-attention, which owns `relative_attention_bias`; None otherwise."""
    if model.config.model_type != "t5":
        return None
    return model.get_decoder().block[0].layer[0].SelfAttention


def max_encoder_pass_tokens(model: Any) -> int | None:
    """T5 builds a [heads, T, T] bias over a whole packed encoder pass: keep its passes short."""
    return 512 if model.config.model_type == "t5" else None
