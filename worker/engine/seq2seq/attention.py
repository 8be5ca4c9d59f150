"""Attention for encoder-decoder models over paged blocks: encoder, decoder self- and cross-attention.

Registered as `ATTENTION_NAME` (distinct from the decoder-only engine's); every forward gets the step's
`Seq2SeqMetadata` as the keyword `METADATA_KWARG`. One function serves three roles, told apart by the
pass and by `module.is_causal` (decoder self-attention is causal, cross-attention is not):

    encoder pass   [ s0 tokens | s1 tokens | ... ]   bidirectional within each sentence (EncoderBucket)
    decoder pass   [ rows of r0 | rows of r1 | ...]  self: causal over the row's own decoder blocks
                                                     cross: over the request's cross K/V pages

Pool layout: one `KVPool` of pages (`paged.pages.KVPages`, as a decoder-only model's), one page per
`BlockPool` block id; a page holds K and V of every decoder layer for `block_size` positions, either

    self K/V     `block_size` decoder positions of one sequence (its block table; beams share blocks)
    cross K/V    `block_size` encoder positions of one request (`Request.encoder_blocks`): every decoder
                 layer's cross-attention K and V of the request's encoder output, at its real length

Cross K/V are made once, in the step a request's encoder runs: the runner passes the new requests' encoder
output as `encoder_hidden_states` with the cache's `is_updated` False, so each layer's own K/V projections
(`k_proj`/`v_proj`, int8 ones included) run on those rows and the cache writes them at
`Seq2SeqMetadata.cross_slots`; every other step reads them from the pages. Per decoder row and layer, the
cross-attention is then per-head attention over head_dim, like self-attention: an earlier design kept only
the encoder output h in the pages (1/12 of the memory with 6 layers) and absorbed the K/V projections into
the queries, which made every row's scores 8x wider and cost a quarter of a Marian decode step on CPU.

Native kernel (fp32 or bf16 pool on CPU, `worker/engine/cpu/native`): single-token decoder rows attend to
their own self blocks, and every decoder row to its request's cross pages, in place: no gather, no padding
(`NativeRows`; the beams of a request are one kernel row of beams x heads query heads, `NativeCross`, so
its cross pages are read once per step, not once per beam). T5's decoder self-attention keeps
SDPA (its bias); its cross-attention has none and takes the kernel.

bf16 end to end: the pool, queries and outputs stay bf16 (the kernel widens bf16 in registers and computes in
fp32; SDPA's bf16 kernels accumulate in fp32); nothing is upcast per step.

Encoder passes in bf16 on an AVX512-BF16 CPU (not T5: its bias) take the packed classifier's native kernel
(`cpu/varlen_bf16.py`): each sentence attends to itself at its own length, no buckets, no padding.

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

from pagedq.worker.engine.cpu import varlen_bf16
from pagedq.worker.engine.cpu.native import paged_decode
from pagedq.worker.engine.paged.pages import KVPages

ATTENTION_NAME = "pagedq_seq2seq"
METADATA_KWARG = "pagedq_seq2seq_metadata"


class KVPool(KVPages):
    """The model's page pool (`paged.pages`): decoder self K/V blocks and requests' cross K/V pages."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_layers, num_blocks, block_size, num_heads, head_dim, dtype, device, compute_dtype)
        self.num_heads = num_heads


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
    """Requests with `n` decoder rows each (their beams) over their cross K/V pages, padded to the longest."""

    rows: torch.Tensor  # [R * n] packed rows, request-major
    n: int
    block_ids: torch.Tensor  # [R * max_blocks] padded block tables, flattened (block 0 where padded)
    mask: torch.Tensor  # [R, 1, 1, max_blocks * block_size]: the requests' real encoder positions


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
    heads over the request's H kv heads (grouped-query attention, heads-major: query head h * n + b is beam b's
    head h): a request's cross pages are read once for all its beams."""

    n: int
    tables: NativeRows  # one row per request, in order
    rows: slice | torch.Tensor  # the requests' decoder rows, request-major: a slice when they are contiguous


@dataclass
class Seq2SeqMetadata:
    """Everything the attention layers need for one forward pass; built once per pass by the runner."""

    pool: KVPool
    encoder: list[EncoderBucket] | None = None  # set for an encoder pass
    encoder_spans: tuple[torch.Tensor, torch.Tensor] | None = None  # its sentences' (starts, lengths), int64 CPU
    self_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (block, offset) of each decoder row's new K/V
    cross_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (page, offset) of each new encoder row's K/V
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
        if position_bias is None and meta.encoder_spans is not None and varlen_bf16.usable(query, key, value):
            scale = query.shape[3] ** -0.5 if scaling is None else scaling
            return varlen_bf16.varlen_attention_bf16(query, key, value, *meta.encoder_spans, scale).unsqueeze(0), None
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
        _cross_attention(meta, int(module.layer_idx), query, scaling, out)  # type: ignore[arg-type]
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
    q, k, v = (_bucket_rows(x, bucket.rows) for x in (query, key, value))  # [B, H, L, D]
    mask: torch.Tensor | None = bucket.valid[:, None, None, :]
    if position_bias is not None:  # T5: the packed bias's corner is every sentence's bias (module docstring)
        bias = position_bias[0, :, :length, :length].unsqueeze(0)
        mask = bias.masked_fill(~bucket.valid[:, None, None, :], float("-inf"))
    elif bool(bucket.valid.all()):
        mask = None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [B, H, L, D]
    flat = o.transpose(1, 2).reshape(b * length, o.shape[1], o.shape[3])
    out[bucket.out_rows] = flat[bucket.flat_valid]


def _bucket_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[1, H, S, D] at token rows [B, L] -> [B, H, L, D] (a view of the gathered rows). One `index_select` of
    whole tokens (H * D values each: a view of the projection's [S, H, D] output) instead of indexing dim 2 of
    [H, S, D], which gathers H strided pieces per token: 4-6x faster on W4's buckets (32 x 128 tokens)."""
    heads, head_dim = x.shape[1], x.shape[3]
    tokens = x[0].transpose(0, 1).reshape(-1, heads * head_dim)
    return tokens.index_select(0, rows.flatten()).view(*rows.shape, heads, head_dim).transpose(1, 2)


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
    q = query[:, :, seg.start : seg.end]
    k, v = (meta.pool.stored(x[:, :, seg.start : seg.end]) for x in (key, value))  # as the pages hold them
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
    meta: Seq2SeqMetadata, layer: int, query: torch.Tensor, scaling: float | None, out: torch.Tensor
) -> None:
    """Every decoder row over its request's cross K/V pages of `layer` (written when its encoder ran)."""
    pool, heads, dim = meta.pool, query.shape[1], query.shape[3]
    scale = scaling if scaling is not None else dim**-0.5
    for group in meta.native_cross or ():
        r, n, tables = group.tables.lens.shape[0], group.n, group.tables
        q = query[0][:, group.rows].reshape(heads, r, n, dim).transpose(0, 1).reshape(r, heads * n, dim).contiguous()
        o, _ = paged_decode(
            q, pool.key_cache[layer], pool.value_cache[layer], tables.block_ids, tables.table_start, tables.lens,
            scale, None,
        )  # fmt: skip
        out[group.rows] = o.view(r, heads, n, dim).transpose(1, 2).reshape(r * n, heads, dim)
    for bucket in meta.cross:  # SDPA over the bucket's gathered pages; a request's beams are its n query rows
        r, n = bucket.mask.shape[0], bucket.n
        q = query[0][:, bucket.rows].view(heads, r, n, dim).transpose(0, 1)  # [R, H, n, D]
        k, v = pool.gather(layer, bucket.block_ids)
        k = k.view(r, -1, heads, dim).transpose(1, 2)  # [R, H, L, D]
        v = v.view(r, -1, heads, dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask, scale=scaling)  # [R, H, n, D]
        out[bucket.rows] = o.transpose(1, 2).reshape(r * n, heads, dim)


def _t5_bias(owner: Any, relative_position: torch.Tensor) -> torch.Tensor:
    """T5's decoder bias for `relative_position` (key minus query position) [...] -> [..., H]."""
    buckets = owner._relative_position_bucket(
        relative_position,
        bidirectional=False,
        num_buckets=owner.relative_attention_num_buckets,
        max_distance=owner.relative_attention_max_distance,
    )
    return owner.relative_attention_bias(buckets)
