"""Attention for encoder-decoder models over paged blocks: encoder, decoder self- and cross-attention.

Registered as `ATTENTION_NAME` (distinct from the decoder-only engine's); every forward gets the step's
`Seq2SeqMetadata` as the keyword `METADATA_KWARG`. One function serves three roles, told apart by the
pass and by `module.is_causal` (decoder self-attention is causal, cross-attention is not):

    encoder pass   [ s0 tokens | s1 tokens | ... ]   bidirectional within each sentence (EncoderBucket)
    decoder pass   [ rows of r0 | rows of r1 | ...]  self: causal over the row's own decoder blocks
                                                     cross: over the request's encoder pages (CrossBucket)

Pool layout: one `KVPool` of pages (`paged.pages.KVPages`, as a decoder-only model's), one page per
`BlockPool` block id. A page holds either

    self K/V     one block of `block_size` decoder positions: K and V of every decoder layer
                 (`key_cache` / `value_cache`, views [layers, blocks, block_size, heads, head_dim])
    encoder      `encoder_block_size` rows of one request's encoder output h (`encoder_states`, a view
                 [blocks, encoder_block_size, d_model]): 2 * layers * block_size rows when
                 heads * head_dim == d_model, so with 6 decoder layers and blocks of 16 a sentence of up
                 to 192 tokens takes one page, where per-layer cross K/V would take 12

Cross-attention reads h, never per-layer K/V. Every decoder layer's cross K/V are linear in the same h
(K = h Wk^T + bk, V = h Wv^T + bv), so per head (weight absorption, as DeepSeek's MLA does):

    scores_j = scale * q . (Wk h_j + bk) = scale * (Wk^T q) . h_j + (a constant: softmax drops it)
    output   = sum_j p_j (Wv h_j + bv)   = Wv (sum_j p_j h_j) + bv            (sum_j p_j = 1)

so a layer projects its query rows into h's space ([H, T, D] x [H, D, d_model]), runs one attention over
h in which the H heads are H query rows of a single key/value head, and projects back through Wv. The
same h serves every layer (one gather per step), the encoder's K/V projections never run, and a request's
cross-attention memory is its real encoder length of h: 1 / (2 * layers) of paged per-layer K/V.
The price is compute: per decoder row and layer, two [D] x [D, d_model] projections per head, and scores
over d_model instead of head_dim -- a few percent of a decoder step's FLOPs for sentences of ~100 tokens,
but on vector units in the kernel. A request's beams share h, so its beams x heads query rows are one
matrix product against h: in bf16 on a CPU with bf16 matrix units (AMX), requests with at least
`seq2seq_runner.SDPA_CROSS_HEADS` query rows take SDPA over the step's gathered h (`CrossBucket`), the rest
(greedy rows) the kernel.

Native kernel (fp32 or bf16 pool on CPU, `worker/engine/cpu/native`): single-token decoder rows attend to their
own self blocks, and every decoder row to its request's encoder pages (keys = values = h, one kv head), in
place: no gather, no padding (`NativeRows`). The beams of a request are one kernel row of num_beams * H query
heads over its pages (`NativeCross`), so the pages are read once per request, not once per beam; each head's
arithmetic is the same either way. T5's decoder self-attention keeps SDPA (its bias).

bf16 end to end: the pool, queries and outputs stay bf16 (the kernel widens bf16 in registers and computes in
fp32; SDPA's bf16 kernels accumulate in fp32); nothing is upcast per step.

Otherwise buckets pad only the attention (never the linear layers): rows of similar length are gathered into one
`[B, H, L, D]` SDPA with a key mask; the padding is masked, never computed into the result.

T5 (relative position bias, `position_bias` kwarg): the encoder's packed bias is computed by T5 over
`arange(T)`, and within one sentence `j - i` is the same as in the packed sequence, so its top-left
`[L, L]` corner is each sentence's bias. Decoder rows get their own bias from the stack's
`relative_attention_bias` (`Seq2SeqMetadata.decoder_bias`). Cross-attention in T5 has no bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pagedq.worker.engine.cpu.native import paged_decode
from pagedq.worker.engine.paged.pages import KVPages

ATTENTION_NAME = "pagedq_seq2seq"
METADATA_KWARG = "pagedq_seq2seq_metadata"


class KVPool(KVPages):
    """The model's page pool (`paged.pages`), whose pages are also read as rows of encoder output."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        encoder_dim: int,
    ) -> None:
        super().__init__(num_layers, num_blocks, block_size, num_heads, head_dim, dtype, device)
        self.num_heads = num_heads
        self.encoder_dim = encoder_dim
        self.encoder_block_size = self.encoder_rows_per_page(num_layers, block_size, num_heads, head_dim, encoder_dim)
        rows = self.pages.view(num_blocks, -1)[:, : self.encoder_block_size * self.encoder_dim]
        self.encoder_states = rows.view(num_blocks, self.encoder_block_size, self.encoder_dim)

    @staticmethod
    def encoder_rows_per_page(num_layers: int, block_size: int, num_heads: int, head_dim: int, encoder_dim: int) -> int:
        rows = 2 * num_layers * block_size * num_heads * head_dim // encoder_dim
        if rows < 1:
            raise ValueError(f"a page of {block_size} positions cannot hold one encoder row of {encoder_dim}")
        return rows

    def write_encoder(self, slots: tuple[torch.Tensor, torch.Tensor], states: torch.Tensor) -> None:
        """Store encoder output rows [N, d_model] at (blocks [N], offsets [N])."""
        self.encoder_states.index_put_(slots, states.to(self.encoder_states.dtype))


@dataclass
class EncoderBucket:
    """Sentences padded together: `rows[b, l]` is the packed row of token l of sentence b (0 where padded)."""

    rows: torch.Tensor  # [B, L] long
    valid: torch.Tensor  # [B, L] bool
    flat_valid: torch.Tensor  # [N] positions in the B*L flattening that hold a real token
    out_rows: torch.Tensor  # [N] the packed rows they map to


@dataclass
class SelfDecodeBucket:
    """Single-token decoder rows attending to their own blocks (padded to the bucket's longest)."""

    rows: torch.Tensor  # [n] packed rows
    block_ids: torch.Tensor  # [n * max_blocks] flattened block tables, padded with block 0
    context_lens: torch.Tensor  # [n] keys each row sees (itself included)
    max_blocks: int
    _bias: torch.Tensor | None = field(default=None, repr=False)  # memoised T5 bias + mask, [n, H, 1, K]


@dataclass
class SelfSegment:
    """Multi-token decoder rows [start, end) of one sequence recomputed from position 0 (after preemption)."""

    start: int
    end: int
    _bias: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class CrossBucket:
    """Requests with `n` query rows each, attending to their encoder rows (padded to the longest)."""

    rows: torch.Tensor  # [R * n] packed rows, request-major
    n: int
    blocks: torch.Tensor  # [R, L]: page of each encoder position (0 where padded)
    offsets: torch.Tensor  # [R, L]: row within that page
    encoder_lens: torch.Tensor  # [R]
    _states: torch.Tensor | None = field(default=None, repr=False)  # gathered once, read by every layer
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def states(self, pool: KVPool) -> tuple[torch.Tensor, torch.Tensor]:
        """The requests' encoder rows [R, 1, L, d_model] and the key mask [R, 1, 1, L]."""
        if self._states is None or self._mask is None:
            self._states = pool.encoder_states[self.blocks, self.offsets].unsqueeze(1)
            key_pos = torch.arange(self.blocks.shape[1], device=self.blocks.device)[None, :]
            self._mask = (key_pos < self.encoder_lens[:, None])[:, None, None, :]
        return self._states, self._mask


@dataclass
class NativeRows:
    """Rows for the native kernel: row i reads lens[i] positions of the table at block_ids[table_start[i]:]."""

    block_ids: torch.Tensor  # flat tables
    table_start: torch.Tensor  # [n]
    lens: torch.Tensor  # [n]
    rows: torch.Tensor | None = None  # [n] packed rows; None: rows 0..n-1 in order (no gather, no scatter)


@dataclass
class NativeCross:
    """Requests with `n` decoder rows each (their beams), read by the native kernel as one row of n * H query
    heads over one key/value head (the encoder rows h): a request's pages are read once for all its beams."""

    n: int
    tables: NativeRows  # one row per request, in order
    rows: slice | torch.Tensor  # the requests' decoder rows, request-major: a slice when they are contiguous


@dataclass
class Seq2SeqMetadata:
    """Everything the attention layers need for one forward pass; built once per pass by the runner."""

    pool: KVPool
    encoder: list[EncoderBucket] | None = None  # set for an encoder pass
    self_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (block, offset) of each decoder row's new K/V
    decode: list[SelfDecodeBucket] = field(default_factory=list)
    segments: list[SelfSegment] = field(default_factory=list)
    cross: list[CrossBucket] = field(default_factory=list)
    decoder_bias: Any = None  # T5: the decoder's layer-0 T5Attention (owner of relative_attention_bias)
    native_decode: NativeRows | None = None  # single-token self rows through the kernel (then `decode` is empty)
    native_cross: list[NativeCross] | None = None  # every row's cross-attention through the kernel (`cross` empty)

    @property
    def is_encoder_pass(self) -> bool:
        return self.encoder is not None


def seq2seq_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, H, Tk, D] -> ([1, T, H, D], None)."""
    meta: Seq2SeqMetadata | None = kwargs.get(METADATA_KWARG)
    if meta is None:
        raise RuntimeError(
            f"{ATTENTION_NAME} attention needs the engine's step metadata; run the model via Seq2SeqEngine"
        )
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, D]
    if meta.is_encoder_pass:
        position_bias = kwargs.get("position_bias")
        for bucket in meta.encoder or ():
            _encoder_attention(bucket, query, key, value, scaling, position_bias, out)
    elif getattr(module, "is_causal", False):
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        if meta.native_decode is not None:
            _native_self_attention(meta, meta.native_decode, layer, query, scaling, out)
        for dbucket in meta.decode:
            out[dbucket.rows] = _decode_attention(meta, dbucket, layer, query, scaling)
        for seg in meta.segments:
            out[seg.start : seg.end] = _segment_attention(meta, seg, query, key, value, scaling)
    else:
        _cross_attention(meta, module, query, scaling, out)
    return out.unsqueeze(0), None


def _encoder_attention(
    bucket: EncoderBucket,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    position_bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    b, length = bucket.rows.shape
    q, k, v = (x[0][:, bucket.rows].transpose(0, 1) for x in (query, key, value))  # [B, H, L, D]
    mask: torch.Tensor | None = bucket.valid[:, None, None, :]
    if position_bias is not None:  # T5: the packed bias's corner is every sentence's bias (module docstring)
        bias = position_bias[0, :, :length, :length].unsqueeze(0)
        mask = bias.masked_fill(~bucket.valid[:, None, None, :], float("-inf"))
    elif bool(bucket.valid.all()):
        mask = None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [B, H, L, D]
    flat = o.transpose(1, 2).reshape(b * length, o.shape[1], o.shape[3])
    out[bucket.out_rows] = flat[bucket.flat_valid]


def _decode_attention(
    meta: Seq2SeqMetadata, bucket: SelfDecodeBucket, layer: int, query: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """A bucket's single-token rows -> [n, H, D], each over its own decoder blocks."""
    pool, n = meta.pool, bucket.rows.shape[0]
    q = query[0][:, bucket.rows].transpose(0, 1).unsqueeze(2)  # [n, H, 1, D]
    k, v = pool.gather(layer, bucket.block_ids)
    k = k.view(n, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
    v = v.view(n, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
    key_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    allowed = (key_pos < bucket.context_lens[:, None])[:, None, None, :]
    mask: torch.Tensor = allowed
    if meta.decoder_bias is not None:
        if bucket._bias is None:
            rel = key_pos - (bucket.context_lens[:, None] - 1)  # [n, K]: key position - query position
            bias = _t5_bias(meta.decoder_bias, rel).permute(0, 2, 1).unsqueeze(2)  # [n, H, 1, K]
            bucket._bias = bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
        mask = bucket._bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling).squeeze(2)


def _native_self_attention(
    meta: Seq2SeqMetadata, rows: NativeRows, layer: int, query: torch.Tensor, scaling: float | None, out: torch.Tensor
) -> None:
    """Single-token decoder rows over their own self blocks, read in place by the native kernel."""
    pool = meta.pool
    q = query[0][:, : rows.lens.shape[0]] if rows.rows is None else query[0][:, rows.rows]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    o, _ = paged_decode(
        q.transpose(0, 1).contiguous(), pool.key_cache[layer], pool.value_cache[layer], rows.block_ids,
        rows.table_start, rows.lens, scale, None,
    )  # fmt: skip
    if rows.rows is None:
        out[: o.shape[0]] = o
    else:
        out[rows.rows] = o


def _segment_attention(
    meta: Seq2SeqMetadata,
    seg: SelfSegment,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """A recomputed prefix [start, end): causal over its own new K/V -> [t, H, D]."""
    q, k, v = (x[:, :, seg.start : seg.end] for x in (query, key, value))
    if meta.decoder_bias is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    else:
        if seg._bias is None:
            pos = torch.arange(seg.end - seg.start, device=q.device)
            rel = pos[None, :] - pos[:, None]  # [t, t]
            causal = rel <= 0
            bias = _t5_bias(meta.decoder_bias, rel).permute(2, 0, 1)  # [H, t, t]
            seg._bias = bias.to(q.dtype).masked_fill(~causal, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=seg._bias.unsqueeze(0), scale=scaling)
    return o[0].transpose(0, 1)


def _cross_attention(
    meta: Seq2SeqMetadata, module: torch.nn.Module, query: torch.Tensor, scaling: float | None, out: torch.Tensor
) -> None:
    """Every row over its request's encoder rows h, through the layer's absorbed K/V projections (module
    docstring); the beams of a request are extra query rows of one attention."""
    heads, dim = query.shape[1], query.shape[3]
    w_k, w_v, b_v = _cross_projections(module, heads, dim)
    q = torch.bmm(query[0], w_k)  # [H, T, d_model]: each head's query in h's space
    scale = scaling if scaling is not None else dim**-0.5  # the head's scale: (Wk^T q) . h == q . k
    by_row = q.transpose(0, 1)  # [T, H, d_model]: a request's rows (its beams) and heads side by side
    width = by_row.shape[2]
    context_rows = by_row.new_empty(by_row.shape)
    if meta.native_cross is not None:  # every row, through the kernel, requests grouped by their number of rows
        states = meta.pool.encoder_states.unsqueeze(2)  # [pages, rows per page, 1 kv head, d_model]
        for group in meta.native_cross:
            rows_q = by_row[group.rows].reshape(-1, group.n * heads, width)  # [R, n * H, d_model]
            tables = group.tables
            o, _ = paged_decode(
                rows_q.contiguous(), states, states, tables.block_ids, tables.table_start, tables.lens, scale, None
            )
            context_rows[group.rows] = o.view(-1, heads, width)
    for bucket in meta.cross:  # every row, through SDPA over the bucket's gathered encoder rows
        states, mask = bucket.states(meta.pool)
        r, n = bucket.encoder_lens.shape[0], bucket.n
        rows_q = by_row.index_select(0, bucket.rows).view(r, 1, n * heads, width)
        o = F.scaled_dot_product_attention(rows_q, states, states, attn_mask=mask, scale=scale)  # [R, 1, nH, m]
        context_rows[bucket.rows] = o.view(r * n, heads, width)
    context = context_rows.transpose(0, 1)  # [H, T, d_model]
    o = torch.bmm(context, w_v.transpose(1, 2))  # [H, T, D]
    if b_v is not None:
        o += b_v[:, None, :]
    out.copy_(o.transpose(0, 1))


def _cross_projections(
    module: torch.nn.Module, heads: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A cross-attention layer's K and V weights as [H, D, d_model] and V's bias as [H, D] (K's bias only
    shifts every score of a row by the same amount)."""
    k, v = (getattr(module, name) for name in (("k_proj", "v_proj") if hasattr(module, "k_proj") else ("k", "v")))
    b_v = None if v.bias is None else v.bias.view(heads, dim)
    return k.weight.view(heads, dim, -1), v.weight.view(heads, dim, -1), b_v


def _t5_bias(owner: Any, relative_position: torch.Tensor) -> torch.Tensor:
    """T5's decoder bias for `relative_position` (key minus query position) [...] -> [..., H]."""
    buckets = owner._relative_position_bucket(
        relative_position,
        bidirectional=False,
        num_buckets=owner.relative_attention_num_buckets,
        max_distance=owner.relative_attention_max_distance,
    )
    return owner.relative_attention_bias(buckets)
