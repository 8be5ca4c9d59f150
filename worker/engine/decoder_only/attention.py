"""Paged attention for unmodified transformers models: the KV pool, the cache object, step metadata.

How it plugs in (transformers 5.x): `AttentionInterface.register(ATTENTION_NAME, paged_attention)`
and `model.set_attn_implementation(ATTENTION_NAME)`; each forward gets `cache=PagedKVCache` and the
step's `AttentionMetadata` as the keyword `METADATA_KWARG`. Every attention layer then calls
`cache.update(k, v, layer_idx, kwargs=...)` (we write the new K/V into their slots) and then
`paged_attention(module, q, k, v, None, ...)` (we attend over the pool). Layers that call
`cache.update(k, v, layer_idx)` without the kwargs (GPT-NeoX) find the step's metadata on the cache
object: the runner sets `PagedKVCache.step_metadata` for the length of each forward.

Score rules beyond `softmax(q.k * scaling)`, matched to transformers' eager attention:
`softcap` (Gemma-2: scores -> tanh(s / c) * c before the mask) and `s_aux` (GPT-OSS: a learned logit per
head in the softmax denominator, a "sink"). Models that use either go through `attend` (fp32 matmul +
softmax with log-sum-exp) instead of SDPA, which has neither; the native kernel soft-caps itself and
sinks are folded in from the log-sum-exp afterwards (`add_sinks`), so shared-prefix merges stay exact.
Any other attention keyword with a value raises `UnsupportedAttention` (the load-time self-check turns
that into a refusal) rather than being silently ignored.

Packed batch of one step (T tokens, one row each, no padding)::

    rows:  [ d0 d1 d2 ... d(B-1) | p0 chunk ........ | p1 chunk .... ]
           decode rows: 1 query  | prefill segments: many queries each
           each reads its blocks   attend causally over cached prefix + new tokens

Pool layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`; slot = block * bs + offset.
Decode rows are sorted by length into buckets (see `DecodeBucket`): one gather of all their blocks per
layer, then one SDPA per bucket over `[rows, KVH, L, D]` with a length mask. On CPU with an fp32 or bf16
pool, decode rows go instead through the native kernel (worker/engine/cpu/native), which reads each row's blocks
in place: no gather, no padding, no upcast copy (`AttentionMetadata.decode_table_start` is set then).
Fresh prompts (nothing cached before the chunk) in bf16 on an AVX512-BF16 CPU go through the native
causal kernel (`cpu/varlen_bf16.py`, consecutive chunks in one call), where torch's SDPA runs bf16 at fp32's
speed (no AMX): W1's bf16 run +3.7% (64 requests, A/B in one process, 2026-12-04).
Grouped-query attention is never expanded: SDPA's `enable_gqa` maps query head h to kv head
h // (H // KVH), as `repeat_kv` does. Sliding windows follow transformers' rule: a query at
position p sees keys at positions (p - window, p]; blocks that fall out of the window are masked,
not freed (a request still holds all its blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pagedq.worker.engine.cpu import varlen_bf16
from pagedq.worker.engine.cpu.native import paged_decode
from pagedq.worker.engine.decoder_only.cascade import CascadeGroup, add_sinks, attend, cascade_attention
from pagedq.worker.engine.encoder.varlen_attention import CPU_NATIVE_HALF
from pagedq.worker.engine.paged.pages import KVPages

ATTENTION_NAME = "pagedq_paged"
METADATA_KWARG = "pagedq_metadata"
_UNSUPPORTED = "run the model through LLMEngine"
# Attention keywords that carry no meaning for paged attention (values the forward passes along anyway).
_IGNORED_KWARGS = frozenset({"position_ids", "use_cache", "output_attentions", "output_router_logits", "return_dict",
                             "cache_position", "dropout", "is_causal"})  # fmt: skip
_KNOWN_KWARGS = _IGNORED_KWARGS | {METADATA_KWARG, "sliding_window", "softcap", "s_aux"}


class UnsupportedAttention(RuntimeError):
    """A model asked paged attention for something it does not implement (a keyword, bidirectional)."""


class PagedKVCache(KVPages):
    """The model's page pool (`paged.pages`), duck-typing the `Cache` calls that decoder layers make."""

    step_metadata: AttentionMetadata | None = None  # set by the runner for the length of each forward

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V ([1, KVH, T, D]) into their slots; return them unchanged (as written: a
        reader of these rows rounds them as the pages do, `KVPages.stored`).

        The slots come from the step metadata in `kwargs`, else from `step_metadata` (layers that call
        `update(k, v, layer_idx)` without kwargs)."""
        meta: AttentionMetadata | None = (kwargs or {}).get(METADATA_KWARG) or self.step_metadata
        if meta is None:
            raise RuntimeError(f"cache.update() outside a step: no step metadata; {_UNSUPPORTED}")
        k, v = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        self.write(layer_idx, meta.slots(self.block_size), k, v)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly; nothing may rely on this



@dataclass
class PrefillSegment:
    """A multi-token chunk of one request: rows [start, end) attend to positions [0, context_len)."""

    start: int
    end: int
    num_cached: int  # tokens before this chunk, already in the pool
    block_ids: torch.Tensor | None  # [ceil(context_len / bs)]; None when num_cached == 0
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @property
    def context_len(self) -> int:
        return self.num_cached + self.end - self.start

    def mask(self, window: int | None, device: torch.device) -> torch.Tensor:
        """[t, context_len] bool, True where the query may attend (causal, optionally windowed)."""
        if window not in self._masks:
            q_pos = torch.arange(self.num_cached, self.context_len, device=device)[:, None]
            k_pos = torch.arange(self.context_len, device=device)[None, :]
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= k_pos > q_pos - window
            self._masks[window] = allowed
        return self._masks[window]


@dataclass
class DecodeBucket:
    """Single-token rows [start, end), sorted by context length and padded to the bucket's longest.

    Buckets keep the padding of the batched gather small: rows of similar length share one."""

    start: int
    end: int
    first_block: int  # where this bucket's block table rows start in `AttentionMetadata.decode_block_ids`
    context_lens: torch.Tensor  # [rows] tokens each row attends to (itself included)
    max_blocks: int
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None, block_size: int) -> torch.Tensor:
        """[rows, 1, 1, max_blocks * bs] bool: the row's own context (within its window)."""
        if window not in self._masks:
            lens = self.context_lens[:, None]
            k_pos = torch.arange(self.max_blocks * block_size, device=lens.device)[None, :]
            allowed = k_pos < lens
            if window is not None:
                allowed &= k_pos > lens - 1 - window
            self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]


@dataclass
class AttentionMetadata:
    """Everything the attention layers need for one step; built once per step by the runner."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] pool slot of each row's new K/V
    decode_buckets: list[DecodeBucket]  # cover rows [0, num_decode)
    decode_block_ids: torch.Tensor  # every bucket's block table rows, padded with block 0, flattened
    prefills: list[PrefillSegment]  # the rows after the decode rows
    cascades: list[CascadeGroup] = field(default_factory=list)  # rows sharing a prefix (suffixes in the ids)
    # Set when decode rows use the native kernel (worker/engine/cpu/native): per decode row, where its table
    # starts in `decode_block_ids` and how many keys it reads there.
    decode_table_start: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    _slots: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def slots(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of every row's new K/V, computed once per step (every layer writes there)."""
        if self._slots is None:
            self._slots = (self.slot_mapping // block_size, self.slot_mapping % block_size)
        return self._slots


@dataclass(frozen=True)
class ScoreRule:
    """How one layer turns q.k into attention weights: `softmax(q.k * scale)`, optionally with
    soft-capped scores (Gemma-2's `softcap`) and per-head sinks (GPT-OSS's `s_aux`)."""

    scale: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [H]

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.sinks is None

    @classmethod
    def of(cls, module: torch.nn.Module, query: torch.Tensor, scaling: float | None, kwargs: dict) -> ScoreRule:
        """The rule for this call; raises `UnsupportedAttention` for what paged attention cannot honour."""
        if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
            raise UnsupportedAttention(f"{type(module).__name__} attends bidirectionally")
        unknown = sorted(k for k, v in kwargs.items() if k not in _KNOWN_KWARGS and v is not None and v is not False)
        if unknown:
            raise UnsupportedAttention(f"{type(module).__name__} passes attention keywords {unknown}")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return cls(scale, kwargs.get("softcap"), kwargs.get("s_aux"))


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KVH, T, D] (this step's rows) -> ([1, T, H, D], None)."""
    meta: AttentionMetadata | None = kwargs.get(METADATA_KWARG)
    if meta is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention got no step metadata; {_UNSUPPORTED}")
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    window = kwargs.get("sliding_window")
    rule = ScoreRule.of(module, query, scaling, kwargs)
    parts = []  # [rows, H, D] each, in row order: buckets, cascade groups, prefill segments
    if meta.decode_table_start is not None and (meta.decode_buckets or meta.cascades):
        parts.extend(_native_decode(meta, layer, query, window, rule))
    elif meta.decode_buckets or meta.cascades:  # one gather for all buckets, then a view per bucket
        k_all, v_all = meta.cache.gather(layer, meta.decode_block_ids)
        for bucket in meta.decode_buckets:
            parts.append(_decode_attention(meta.cache, bucket, query, k_all, v_all, window, rule))
        for group in meta.cascades:
            o = cascade_attention(
                meta.cache, group, layer, query, k_all, v_all, window, rule.scale,
                softcap=rule.softcap, sinks=rule.sinks,
            )  # fmt: skip
            parts.append(o)
    fresh: list[PrefillSegment] = []  # consecutive fresh prompts that go through the native kernel together
    for seg in meta.prefills:
        if _native_prefill(meta, seg, query, key, value, window, rule):
            fresh.append(seg)
            continue
        if fresh:
            parts.append(_native_prefills(fresh, query, key, value, rule))
            fresh = []
        parts.append(_prefill_attention(meta, seg, layer, query, key, value, window, rule))
    if fresh:
        parts.append(_native_prefills(fresh, query, key, value, rule))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.unsqueeze(0), None


def _native_decode(
    meta: AttentionMetadata, layer: int, query: torch.Tensor, window: int | None, rule: ScoreRule
) -> list[torch.Tensor]:
    """Every decode row through the native kernel, reading its blocks in place (no gather, no padding);
    shared-prefix groups attend to their prefix once and merge it with the kernel's suffix result."""
    assert meta.decode_table_start is not None and meta.decode_context_lens is not None
    cache = meta.cache
    rows = meta.decode_table_start.shape[0]
    q = query[0, :, :rows].transpose(0, 1).contiguous()  # [rows, H, D]
    # The kernel writes the model's dtype itself, unless its output is merged (sinks, shared prefixes): fp32 then.
    direct = rule.sinks is None and not meta.cascades
    out, lse = paged_decode(
        q, cache.key_cache[layer], cache.value_cache[layer], meta.decode_block_ids,
        meta.decode_table_start, meta.decode_context_lens, rule.scale, window, rule.softcap,
        out_dtype=query.dtype if direct else torch.float32,
    )  # fmt: skip
    plain = meta.decode_buckets[-1].end if meta.decode_buckets else 0
    parts = []
    if plain:
        o = out[:plain] if rule.sinks is None else add_sinks(out[:plain], lse[:plain], rule.sinks)
        parts.append(o.to(query.dtype))
    for group in meta.cascades:
        rows_ = slice(group.suffix.start, group.suffix.end)
        suffix = (out[rows_], lse[rows_])
        o = cascade_attention(
            cache, group, layer, query, None, None, window, rule.scale, suffix, softcap=rule.softcap, sinks=rule.sinks
        )
        parts.append(o)
    return parts


def _decode_attention(
    kv: PagedKVCache,
    bucket: DecodeBucket,
    query: torch.Tensor,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    window: int | None,
    rule: ScoreRule,
) -> torch.Tensor:
    """A bucket's rows of query [1, H, T, D] -> [rows, H, D], each over its own blocks ([rows, KVH, L, D])."""
    rows, bs = bucket.end - bucket.start, kv.block_size
    q = query[0, :, bucket.start : bucket.end].transpose(0, 1).unsqueeze(2)  # [rows, H, 1, D]
    lo, hi = bucket.first_block * bs, (bucket.first_block + rows * bucket.max_blocks) * bs
    k = k_all[lo:hi].view(rows, -1, kv.num_kv_heads, kv.head_dim).transpose(1, 2)
    v = v_all[lo:hi].view(rows, -1, kv.num_kv_heads, kv.head_dim).transpose(1, 2)
    return _masked_attention(q, k, v, bucket.mask(window, kv.block_size), rule).squeeze(2)


def _native_prefill(
    meta: AttentionMetadata, seg: PrefillSegment, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    window: int | None, rule: ScoreRule,
) -> bool:
    """Whether a chunk goes through the native bf16 kernel (cpu/varlen_bf16.py): nothing cached before it, plain
    scores, no window that cuts it, and bf16 queries and K/V as the pool stores them on an AVX512-BF16 CPU."""
    t = seg.end - seg.start
    return (seg.num_cached == 0 and rule.plain and (window is None or window >= t) and not meta.cache.rounds
            and varlen_bf16.usable(query, key, value))  # fmt: skip


def _native_prefills(
    segs: list[PrefillSegment], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rule: ScoreRule
) -> torch.Tensor:
    """Consecutive fresh chunks, each attending causally to itself, in one kernel call -> [rows, H, D]."""
    first, end = segs[0].start, segs[-1].end
    starts = torch.tensor([seg.start - first for seg in segs], dtype=torch.int64)
    lengths = torch.tensor([seg.end - seg.start for seg in segs], dtype=torch.int64)
    q, k, v = (x[:, :, first:end] for x in (query, key, value))
    return varlen_bf16.varlen_attention_bf16(q, k, v, starts, lengths, rule.scale, causal=True)


def _prefill_attention(
    meta: AttentionMetadata,
    seg: PrefillSegment,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int | None,
    rule: ScoreRule,
) -> torch.Tensor:
    """A chunk's queries [1, H, t, D] over its cached prefix plus itself -> [t, H, D]."""
    q = query[:, :, seg.start : seg.end]
    t = seg.end - seg.start
    if seg.num_cached == 0:  # nothing in the pool before this chunk: use this step's K/V directly
        k, v = (meta.cache.stored(x[:, :, seg.start : seg.end]) for x in (key, value))  # as the pages hold them
        if rule.plain and (window is None or window >= t):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=rule.scale, enable_gqa=True)
            return o[0].transpose(0, 1)
    else:
        assert seg.block_ids is not None
        k, v = meta.cache.gather(layer, seg.block_ids)
        k = k[: seg.context_len].transpose(0, 1).unsqueeze(0)
        v = v[: seg.context_len].transpose(0, 1).unsqueeze(0)
    o = _masked_attention(q, k, v, seg.mask(window, q.device)[None, None], rule)
    return o[0].transpose(0, 1)


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, rule: ScoreRule
) -> torch.Tensor:
    """q [B, H, Q, D] over k/v [B, KVH, L, D] with a boolean mask [B or 1, 1, Q or 1, L] -> [B, H, Q, D].

    Plain rules go to SDPA; soft-capping and sinks to `attend` (fp32), GQA as a view (no repeated K/V)."""
    if rule.plain:
        return _masked_sdpa(q, k, v, mask, rule.scale)
    b, heads, nq, d = q.shape
    kvh = k.shape[1]
    q5 = q.reshape(b, kvh, heads // kvh, nq, d)
    o, lse = attend(q5, k.unsqueeze(2), v.unsqueeze(2), mask.unsqueeze(2), rule.scale, rule.softcap)
    o, lse = o.reshape(b, heads, nq, d), lse.reshape(b, heads, nq)
    if rule.sinks is not None:
        o = add_sinks(o.transpose(1, 2), lse.transpose(1, 2), rule.sinks).transpose(1, 2)
    return o.to(q.dtype)


def _masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """SDPA with a boolean mask; GQA without repeating K/V.

    On a CPU without native half precision (AVX2 only), masked bf16/fp16 SDPA is several times slower than
    fp32 (measured with torch 2.13), so half-precision inputs are upcast there. Where the CPU computes the
    dtype natively (`CPU_NATIVE_HALF`: AVX512-BF16 / AMX for bf16) it is the other way round -- SDPA keeps
    scores, softmax and sums in fp32 inside, and the upcast copies cost more (bf16 vs upcast, one thread, AMX,
    8 heads on 4 kv heads of 64: 16 rows x 272 keys 0.31 vs 1.48 ms; 64 x 300: 1.8 vs 22.9 ms; a 512-token
    chunk over 1024: 5.5 vs 12.3 ms) -- so it keeps the input dtype, as CUDA does."""
    if q.device.type == "cpu" and q.dtype != torch.float32 and q.dtype not in CPU_NATIVE_HALF:
        o = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, scale=scaling, enable_gqa=True
        )
        return o.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
