"""Attention for encoder-decoder models over paged blocks: encoder, decoder self- and cross-attention.

Registered as `ATTENTION_NAME` (distinct from the decoder-only engine's); every forward gets the step's
`Seq2SeqMetadata` as the keyword `METADATA_KWARG`. One function serves three roles, told apart by the
pass and by `module.is_causal` (decoder self-attention is causal, cross-attention is not):

    encoder pass   [ s0 tokens | s1 tokens | ... ]   bidirectional within each sentence (EncoderBucket)
    decoder pass   [ rows of r0 | rows of r1 | ...]  self: causal over the row's own decoder blocks
                                                     cross: over the request's cross blocks (CrossBucket)

Pool layout (one `KVPool` shared by self and cross K/V): per decoder layer `[num_blocks, block_size,
heads, head_dim]`, slot = block * block_size + offset. A cross block holds projected encoder K/V of one
request (exactly ceil(encoder_len / block_size) blocks); a self block holds decoder K/V of one or more
beams.

Buckets pad only the attention (never the linear layers): rows of similar length are gathered into one
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

ATTENTION_NAME = "pagedq_seq2seq"
METADATA_KWARG = "pagedq_seq2seq_metadata"


class KVPool:
    """The K/V tensors of every decoder layer, indexed by `BlockPool` block ids (self and cross K/V alike)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_heads, head_dim)
        # Zeros, not empty: padded bucket rows read unused slots; they are masked, but 0 * NaN is NaN.
        self.key_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.value_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_heads, self.head_dim = num_heads, head_dim

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store K/V rows [N, H, D] at pool `slots` [N] of `layer`."""
        self.key_cache[layer].view(-1, self.num_heads, self.head_dim).index_copy_(0, slots, key)
        self.value_cache[layer].view(-1, self.num_heads, self.head_dim).index_copy_(0, slots, value)

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids` [N] as [N * block_size, H, D]."""
        k = self.key_cache[layer].index_select(0, block_ids)
        v = self.value_cache[layer].index_select(0, block_ids)
        return k.flatten(0, 1), v.flatten(0, 1)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (src -> dst), every layer at once."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.key_cache.device)
            dst = torch.tensor([d for _, d in copies], device=self.key_cache.device)
            self.key_cache[:, dst] = self.key_cache[:, src]
            self.value_cache[:, dst] = self.value_cache[:, src]


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
    """Requests with `n` query rows each, attending to their cross blocks (padded to the longest)."""

    rows: torch.Tensor  # [R * n] packed rows, request-major
    n: int
    block_ids: torch.Tensor  # [R * max_blocks]
    encoder_lens: torch.Tensor  # [R]
    max_blocks: int
    _mask: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class Seq2SeqMetadata:
    """Everything the attention layers need for one forward pass; built once per pass by the runner."""

    pool: KVPool
    encoder: list[EncoderBucket] | None = None  # set for an encoder pass
    self_slots: torch.Tensor | None = None  # [T] pool slot of each decoder row's new self K/V
    cross_slots: torch.Tensor | None = None  # [S] pool slot of each new encoder token's cross K/V
    decode: list[SelfDecodeBucket] = field(default_factory=list)
    segments: list[SelfSegment] = field(default_factory=list)
    cross: list[CrossBucket] = field(default_factory=list)
    decoder_bias: Any = None  # T5: the decoder's layer-0 T5Attention (owner of relative_attention_bias)

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
        for dbucket in meta.decode:
            out[dbucket.rows] = _decode_attention(meta, dbucket, layer, query, scaling)
        for seg in meta.segments:
            out[seg.start : seg.end] = _segment_attention(meta, seg, query, key, value, scaling)
    else:
        for cbucket in meta.cross:
            _cross_attention(meta.pool, cbucket, int(module.layer_idx), query, scaling, out)  # type: ignore[arg-type]
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
    pool: KVPool, bucket: CrossBucket, layer: int, query: torch.Tensor, scaling: float | None, out: torch.Tensor
) -> None:
    """Every request's rows over its own cross blocks; the beams of a request share one gather."""
    r = bucket.encoder_lens.shape[0]
    heads, dim = query.shape[1], query.shape[3]
    q = query[0][:, bucket.rows].view(heads, r, bucket.n, dim).transpose(0, 1)  # [R, H, n, D]
    k, v = pool.gather(layer, bucket.block_ids)
    k = k.view(r, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
    v = v.view(r, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
    if bucket._mask is None:
        key_pos = torch.arange(k.shape[2], device=q.device)[None, :]
        bucket._mask = (key_pos < bucket.encoder_lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bucket._mask, scale=scaling)  # [R, H, n, D]
    out[bucket.rows] = o.permute(0, 2, 1, 3).reshape(r * bucket.n, heads, dim)


def _t5_bias(owner: Any, relative_position: torch.Tensor) -> torch.Tensor:
    """T5's decoder bias for `relative_position` (key minus query position) [...] -> [..., H]."""
    buckets = owner._relative_position_bucket(
        relative_position,
        bidirectional=False,
        num_buckets=owner.relative_attention_num_buckets,
        max_distance=owner.relative_attention_max_distance,
    )
    return owner.relative_attention_bias(buckets)
