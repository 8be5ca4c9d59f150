"""Seq2seq model runner: one step = (encoder pass for newly admitted requests) + one packed decoder pass.

    encoder pass:  input_ids [1, S]  = the new requests' sentences back to back (no padding)
    decoder pass:  decoder_input_ids [1, T] = every running sequence's uncomputed tokens
                   (one row per beam while decoding; a whole prefix when recomputing after preemption)
                   encoder_outputs = the encoder pass's output [1, S, d_model]: each layer's cross K/V
                   projections run on it once and write the new requests' cross pages (`seq2seq.cache`);
                   with no new request, a placeholder. Cross-attention reads every request's pages.

Only each sequence's last row reaches the LM head: a forward pre-hook on the output embeddings takes
those rows of its input (T5's scaling already applied) and hands the head an empty slice, and the runner
runs the head on the rows it took (the `*ForConditionalGeneration` heads take no `logits_to_keep`). The
BART family's `final_logits_bias` is then added in place, or by the int8 head's dequantize pass as its
bias: one pass over [rows, vocab] less than the model's `lm_head(h) + final_logits_bias` (a tenth of a
beam-search step of Marian at 256 rows x 58k words), the same bits; a bf16 head adds it in oneDNN's epilogue
(`PackedLinear.plus`: one rounding instead of two, within bf16's stated tolerance, not the same bits). The
load-time self-check compares the result with the model's own forward.

Traps this avoids (transformers 5.x): `use_cache=False` with `cache=` given (layers still call
`cache.update`); positions from hooks, not from `cache.get_seq_length()`; `set_attn_implementation`
changes the model's config for every model built from the same config object.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from pagedq.worker.engine.core.hf_compat import cache_kwargs
from pagedq.worker.engine.core.request import TokenSequence
from pagedq.worker.engine.cpu.linear import PackedLinear
from pagedq.worker.engine.cpu.native import use_native_decode
from pagedq.worker.engine.cpu.quantization import Int8Linear
from pagedq.worker.engine.paged.decode_plan import DecodeRow, flat_tables, padded_tables, sorted_buckets
from pagedq.worker.engine.seq2seq.attention import (
    ATTENTION_NAME,
    METADATA_KWARG,
    CrossBucket,
    EncoderBucket,
    KVPool,
    NativeCross,
    NativeRows,
    SelfDecodeBucket,
    SelfSegment,
    Seq2SeqMetadata,
    seq2seq_attention,
)
from pagedq.worker.engine.seq2seq.cache import PagedEncoderDecoderCache
from pagedq.worker.engine.seq2seq.model import (
    DecoderShape,
    PositionHooks,
    check_model,
    max_encoder_pass_tokens,
    t5_decoder_bias_owner,
)

AttentionInterface.register(ATTENTION_NAME, seq2seq_attention)

BUCKET_ROWS = 16  # sequences (or requests, or sentences) padded together in one attention call


@dataclass
class StepItem:
    """One request's part of a step: its decoder sequences and where its K/V live.

    Each sequence computes its tokens [num_computed_tokens, num_tokens): one while decoding, all of
    them (from 0) when recomputing. `encoder_ids` is set when the request's encoder runs in this step."""

    sequences: Sequence[TokenSequence]
    self_blocks: Sequence[Sequence[int]]  # block table of each sequence
    cross_blocks: Sequence[int]
    encoder_len: int
    encoder_ids: Sequence[int] | None = None


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Seq2SeqRunner:
    """Owns the model's attention switch, the position and LM-head hooks, and the cache object."""

    def __init__(self, model: Any, pool: KVPool, native_decode: bool | None = None) -> None:
        """`native_decode`: decoder rows' attention through the native kernel (None: wherever it applies,
        an fp32 or bf16 pool on CPU with the kernel built; False: always gather + SDPA)."""
        check_model(model)
        self.native = use_native_decode(pool.pages, native_decode)
        self.model, self.pool = model, pool
        self.shape = DecoderShape.of(model)
        self.cache = PagedEncoderDecoderCache(pool, self.shape.num_layers)
        self.decoder_bias = t5_decoder_bias_owner(model)
        self.max_encoder_pass = max_encoder_pass_tokens(model)
        self.device = pool.device
        self._keep: torch.Tensor | None = None
        self._head_rows: torch.Tensor | None = None  # what the head's pre-hook took in this pass
        self.head = model.get_output_embeddings()
        bias = getattr(model, "final_logits_bias", None)  # the BART family: lm_head(h) + final_logits_bias
        self.logits_bias = bias.reshape(-1) if isinstance(bias, torch.Tensor) else None
        d_model = model.config.d_model
        self._placeholder_states = torch.zeros(1, 1, d_model, dtype=model.dtype, device=self.device)
        # Last, what changes the model (undone by `close`): its hooks and its attention implementation.
        self.positions = PositionHooks(model)
        self._head_hook = self.head.register_forward_pre_hook(self._take_head_rows)
        loaded_with = model.config._attn_implementation  # another runner on the same model may have switched it
        self.original_attention = loaded_with if loaded_with != ATTENTION_NAME else "sdpa"
        model.set_attn_implementation(ATTENTION_NAME)

    def close(self) -> None:
        """Give the model back as loaded: its attention implementation, no hooks. The runner is unusable after."""
        self.positions.remove()
        self._head_hook.remove()
        self.model.set_attn_implementation(self.original_attention)

    @contextmanager
    def original_attention_implementation(self) -> Iterator[None]:
        """Run the model as loaded (e.g. `generate` for a fallback request), then switch back."""
        self.model.set_attn_implementation(self.original_attention)
        try:
            yield
        finally:
            self.model.set_attn_implementation(ATTENTION_NAME)

    def _take_head_rows(
        self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...] | None:
        if self._keep is None:
            return None
        self._head_rows = args[0][0, self._keep]
        return (args[0][:, :0], *args[1:])

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The model's logits of the kept rows [N, d_model] -> [N, vocab] (module docstring)."""
        bias, head = self.logits_bias, self.head
        if bias is not None and isinstance(head, Int8Linear) and head.bias is None and bias.dtype == torch.float32:
            return head(rows, add=bias)
        if bias is not None and isinstance(head, PackedLinear):
            return head.plus(rows, bias)
        logits = head(rows)
        if bias is not None:
            logits.add_(bias)
        return logits

    def _tensor(self, values: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # ---- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, items: Sequence[StepItem], copies: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """Run one step; returns logits [N, vocab] in the model's dtype (no fp32 copy: greedy picks read them as
        they are, beam search's log-softmax widens its rows), one row per sequence (items, then sequences)."""
        self.pool.copy_blocks(list(copies))
        new = [item for item in items if item.encoder_ids is not None]
        states = self._encode(new) if new else self._placeholder_states
        meta, input_ids = self._decoder_metadata(items)
        if new:
            meta.cross_slots = self._cross_slots(new)
        self.cache.project_cross(bool(new))
        self.cache.step_metadata = meta  # for layers that call update() without their kwargs (earlier 5.x)
        try:
            out = self.model(
                encoder_outputs=(states,),
                decoder_input_ids=input_ids,
                use_cache=False,
                **cache_kwargs(self.model, self.cache),
                **{METADATA_KWARG: meta},
            )
            rows = self._head_rows
            assert rows is not None and out.logits.shape[1] == 0, "the LM head's pre-hook did not run"
        finally:  # the hooks are inert between steps
            self._keep = self._head_rows = None
            self.cache.step_metadata = None
            self.positions.rows["decoder"] = None
        return self._logits(rows)

    # ---- encoder ------------------------------------------------------------------------------

    def _encode(self, items: list[StepItem]) -> torch.Tensor:
        """Encoder states [1, S, d_model] of `items`' sentences, back to back in item order."""
        limit = self.max_encoder_pass
        passes: list[list[StepItem]] = [[]]
        size = 0
        for item in items:
            if limit is not None and passes[-1] and size + item.encoder_len > limit:
                passes.append([])
                size = 0
            passes[-1].append(item)
            size += item.encoder_len
        return torch.cat([self._encoder_pass(p) for p in passes], dim=1)

    def _encoder_pass(self, items: list[StepItem]) -> torch.Tensor:
        ids: list[int] = []
        rows: list[int] = []
        starts = []
        for item in items:
            assert item.encoder_ids is not None
            starts.append(len(ids))
            rows.extend(self.positions.positions("encoder", item.encoder_ids, 0, item.encoder_len))
            ids.extend(item.encoder_ids)
        order = sorted(range(len(items)), key=lambda i: items[i].encoder_len)
        buckets = [self._encoder_bucket([(starts[i], items[i].encoder_len) for i in chunk])
                   for chunk in _chunks(order, BUCKET_ROWS)]  # fmt: skip
        spans = None
        if self.device.type == "cpu":  # the native bf16 kernel's arguments (seq2seq_attention decides)
            lengths = [item.encoder_len for item in items]
            spans = (torch.tensor(starts, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64))
        meta = Seq2SeqMetadata(self.pool, encoder=buckets, encoder_spans=spans)
        self.positions.rows["encoder"] = self._tensor(rows) if rows else None
        try:
            out = self.model.get_encoder()(input_ids=self._tensor([ids]).view(1, -1), **{METADATA_KWARG: meta})
        finally:
            self.positions.rows["encoder"] = None
        return out.last_hidden_state

    def _encoder_bucket(self, spans: list[tuple[int, int]]) -> EncoderBucket:
        """Sentences (start, length) of the packed pass, padded to the longest."""
        width = max(length for _, length in spans)
        rows = [[start + i if i < length else 0 for i in range(width)] for start, length in spans]
        valid = [[i < length for i in range(width)] for _, length in spans]
        flat_valid = [b * width + i for b, (_, length) in enumerate(spans) for i in range(length)]
        out_rows = [start + i for start, length in spans for i in range(length)]
        dev = self.device
        return EncoderBucket(
            rows=self._tensor(rows),
            valid=torch.tensor(valid, dtype=torch.bool, device=dev),
            flat_valid=self._tensor(flat_valid),
            out_rows=self._tensor(out_rows),
        )

    # ---- decoder ------------------------------------------------------------------------------

    def _decoder_metadata(self, items: Sequence[StepItem]) -> tuple[Seq2SeqMetadata, torch.Tensor]:
        bs = self.pool.block_size
        ids: list[int] = []
        positions: list[int] = []
        blocks: list[int] = []
        offsets: list[int] = []
        keep: list[int] = []
        decode_rows: list[DecodeRow] = []
        segments: list[SelfSegment] = []
        spans: list[tuple[int, int, StepItem]] = []  # (first row, rows, item)
        for item in items:
            first = len(ids)
            for seq, table in zip(item.sequences, item.self_blocks, strict=True):
                p0, end = seq.num_computed_tokens, seq.num_tokens
                tokens = seq.all_token_ids
                row = len(ids)
                ids.extend(tokens[p0:end])
                positions.extend(self.positions.positions("decoder", tokens, p0, end))
                blocks.extend(table[p // bs] for p in range(p0, end))
                offsets.extend(p % bs for p in range(p0, end))
                if end - p0 == 1:
                    decode_rows.append((row, end, table))
                else:
                    assert p0 == 0, f"{seq} resumes mid-prefix; the engine recomputes prefixes from 0"
                    segments.append(SelfSegment(row, row + end))
                keep.append(len(ids) - 1)
            spans.append((first, len(ids) - first, item))

        native_self = self.native and self.decoder_bias is None  # T5's self-attention has a bias: SDPA
        meta = Seq2SeqMetadata(
            self.pool,
            self_slots=(self._tensor(blocks), self._tensor(offsets)),
            decode=[] if native_self else self._decode_buckets(decode_rows),
            segments=segments,
            cross=[] if self.native else self._cross_buckets(spans),
            decoder_bias=self.decoder_bias,
            native_decode=self._native_decode(decode_rows) if native_self and decode_rows else None,
            native_cross=self._native_cross(spans) if self.native else None,
        )
        self._keep = self._tensor(keep)
        self.positions.rows["decoder"] = self._tensor(positions) if self.positions.tables else None
        return meta, self._tensor(ids).view(1, -1)

    def _cross_slots(self, new: list[StepItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) of every encoder position of the new requests, in encoding order."""
        bs = self.pool.block_size
        positions = [(item.cross_blocks, p) for item in new for p in range(item.encoder_len)]
        pages = self._tensor([blocks[p // bs] for blocks, p in positions])
        return pages, self._tensor([p % bs for _, p in positions])

    def _native_decode(self, rows: list[DecodeRow]) -> NativeRows:
        flat, starts = flat_tables([table for _, _, table in rows])
        order = [r for r, _, _ in rows]
        return NativeRows(
            block_ids=self._tensor(flat),
            table_start=self._tensor(starts),
            lens=self._tensor([n for _, n, _ in rows]),
            rows=None if order == list(range(len(order))) else self._tensor(order),
        )

    def _native_cross(self, spans: list[tuple[int, int, StepItem]]) -> list[NativeCross]:
        """Every decoder row over its request's cross pages: requests grouped by their number of rows, each
        request one kernel row whose query heads are those of all its rows (beams read their pages once)."""
        groups: dict[int, list[tuple[int, int, StepItem]]] = {}
        for span in spans:
            groups.setdefault(span[1], []).append(span)
        out = []
        for n, group in groups.items():
            flat, starts = flat_tables([item.cross_blocks for _, _, item in group])
            first, last = group[0][0], group[-1][0] + n
            rows: slice | torch.Tensor
            if last - first == n * len(group):  # contiguous: no gather
                rows = slice(first, last)
            else:
                rows = self._tensor([r for start, _, _ in group for r in range(start, start + n)])
            tables = NativeRows(
                block_ids=self._tensor(flat),
                table_start=self._tensor(starts),
                lens=self._tensor([item.encoder_len for _, _, item in group]),
            )
            out.append(NativeCross(n, tables, rows))
        return out

    def _decode_buckets(self, rows: list[DecodeRow]) -> list[SelfDecodeBucket]:
        buckets = []
        for chunk in sorted_buckets(rows, BUCKET_ROWS):
            flat, width = padded_tables([table for _, _, table in chunk])
            buckets.append(
                SelfDecodeBucket(
                    rows=self._tensor([r for r, _, _ in chunk]),
                    block_ids=self._tensor(flat),
                    context_lens=self._tensor([n for _, n, _ in chunk]),
                    max_blocks=width,
                )
            )
        return buckets

    def _cross_buckets(self, spans: list[tuple[int, int, StepItem]]) -> list[CrossBucket]:
        """Requests with the same number of rows, by encoder length, their tables padded to the bucket's longest."""
        bs = self.pool.block_size
        by_rows: dict[int, list[tuple[int, int, StepItem]]] = {}
        for span in spans:
            by_rows.setdefault(span[1], []).append(span)
        buckets = []
        for n, group in sorted(by_rows.items()):
            group.sort(key=lambda s: s[2].encoder_len)
            for chunk in _chunks(group, BUCKET_ROWS):
                flat, width = padded_tables([item.cross_blocks for _, _, item in chunk])
                lens = self._tensor([item.encoder_len for _, _, item in chunk])
                position = torch.arange(width * bs, device=self.device)
                buckets.append(
                    CrossBucket(
                        rows=self._tensor([first + i for first, _, _ in chunk for i in range(n)]),
                        n=n,
                        block_ids=self._tensor(flat),
                        mask=(position[None, :] < lens[:, None])[:, None, None, :],
                    )
                )
        return buckets
