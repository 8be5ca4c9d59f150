"""Shared-prefix (cascade) attention for decode rows whose block tables start with the same blocks.

When many running requests share a long cached prefix (questions about one context), the plain
decode path gathers that prefix once per request. Here a group of rows attends to the shared prefix
ONCE, as one batched query against one copy of its K/V, and to its own suffix blocks separately;
the two partial results are merged exactly with their log-sum-exp::

    row r:  [ shared prefix blocks P0 P1 ... | own blocks S_r ... ]
    o_r = (o_prefix * e^lse_prefix + o_suffix * e^lse_suffix) / (e^lse_prefix + e^lse_suffix)

Sliding windows are honoured by masking both parts. Attention here is computed in fp32 with
matmul + softmax (device-generic); only decode rows use it. Soft-capped scores (Gemma-2) are capped in
each part; attention sinks (GPT-OSS) join the denominator once, after the merge (`add_sinks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagedq.worker.engine.decoder_only.attention import DecodeBucket, PagedKVCache


@dataclass
class CascadeGroup:
    """Decode rows [suffix.start, suffix.end) sharing `prefix_block_ids`; `suffix` holds the rest."""

    prefix_block_ids: torch.Tensor  # [P] full blocks every row of the group starts with
    suffix: DecodeBucket  # the rows' own blocks after the prefix; context_lens counted from the prefix end
    positions: torch.Tensor  # [rows] absolute position of each row's query token
    _prefix_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def prefix_mask(self, window: int, prefix_len: int) -> torch.Tensor:
        """[rows, prefix_len] bool: prefix keys inside each row's sliding window."""
        if window not in self._prefix_masks:
            k_pos = torch.arange(prefix_len, device=self.positions.device)[None, :]
            self._prefix_masks[window] = k_pos > self.positions[:, None] - window
        return self._prefix_masks[window]


def find_shared_prefixes(tables: list[list[int]], min_blocks: int) -> list[tuple[list[int], int]]:
    """Groups of >= 2 rows (by index) whose tables share their first `P >= min_blocks` blocks.

    Rows are grouped by their first block; P is the group's longest common prefix, capped so every
    row keeps at least one block of its own (the one its new token is written to)."""
    by_first: dict[int, list[int]] = {}
    for i, table in enumerate(tables):
        by_first.setdefault(table[0], []).append(i)
    groups = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        limit = min(len(tables[i]) for i in rows) - 1
        first = tables[rows[0]]
        p = 0
        while p < limit and all(tables[i][p] == first[p] for i in rows):
            p += 1
        if p >= min_blocks:
            groups.append((rows, p))
    return groups


def cascade_attention(
    kv: PagedKVCache,
    group: CascadeGroup,
    layer: int,
    query: torch.Tensor,
    k_all: torch.Tensor | None,
    v_all: torch.Tensor | None,
    window: int | None,
    scaling: float,
    suffix: tuple[torch.Tensor, torch.Tensor] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The group's rows of query [1, H, T, D] -> [rows, H, D] (prefix once, suffix per row, merged).

    The suffix part comes from `k_all`/`v_all` (the step's gathered decode blocks) or, already computed
    by the native kernel (with the same `softcap`, no sinks), as `suffix` = (out [rows, H, D], lse [rows, H]).
    `sinks` [H]: learned per-head logits in the softmax denominator (see `add_sinks`)."""
    sfx = group.suffix
    rows, bs, kvh, d = sfx.end - sfx.start, kv.block_size, kv.num_kv_heads, kv.head_dim
    heads = query.shape[1]
    q = query[0, :, sfx.start : sfx.end].float().contiguous()  # [H, rows, D], heads ordered kv_head * G + g
    # Prefix: all rows of all query heads of a kv head form one query matrix over one K/V copy.
    kp, vp = kv.gather(layer, group.prefix_block_ids)  # [Lp, KVH, D]
    prefix_len = kp.shape[0]
    qp = q.reshape(kvh, -1, d)  # [KVH, G * rows, D]
    mask_p = None
    if window is not None:
        mask_p = group.prefix_mask(window, prefix_len).repeat(heads // kvh, 1)[None]  # [1, G * rows, Lp]
    o_p, lse_p = attend(qp, kp.transpose(0, 1), vp.transpose(0, 1), mask_p, scaling, softcap)
    o_p = o_p.view(kvh, -1, rows, d).permute(2, 0, 1, 3)  # [rows, KVH, G, D]
    lse_p = lse_p.view(kvh, -1, rows).permute(2, 0, 1)
    if suffix is not None:
        o_s, lse_s = suffix[0].view(rows, kvh, -1, d), suffix[1].view(rows, kvh, -1)
    else:  # each row over its own (padded) blocks, as in the plain decode path
        assert k_all is not None and v_all is not None
        lo, hi = sfx.first_block * bs, (sfx.first_block + rows * sfx.max_blocks) * bs
        ks = k_all[lo:hi].view(rows, -1, kvh, d).transpose(1, 2)  # [rows, KVH, Ls, D]
        vs = v_all[lo:hi].view(rows, -1, kvh, d).transpose(1, 2)
        qs = q.view(kvh, -1, rows, d).permute(2, 0, 1, 3)  # [rows, KVH, G, D]
        # Suffix context lengths count from the prefix end: the (translation-invariant) window mask holds.
        o_s, lse_s = attend(qs, ks, vs, sfx.mask(window, bs), scaling, softcap)
    lse = torch.logaddexp(lse_p, lse_s)
    o = o_p * (lse_p - lse).exp().unsqueeze(-1) + o_s * (lse_s - lse).exp().unsqueeze(-1)
    o, lse = o.reshape(rows, heads, d), lse.reshape(rows, heads)
    if sinks is not None:
        o = add_sinks(o, lse, sinks)
    return o.to(query.dtype)


def add_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention with a sink from attention without: o [..., H, D], lse [..., H], sinks [H] -> [..., H, D].

    A sink is a score with no value (transformers' GPT-OSS appends it to the scores and drops its column
    after the softmax), so it only enlarges the denominator: o * e^lse / (e^lse + e^sink)
    = o * sigmoid(lse - sink). A row with no visible key (lse -inf) stays 0."""
    return o * torch.sigmoid(lse - sinks.float()).unsqueeze(-1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in fp32 that also returns the log-sum-exp of the scores.

    q [..., Q, D], k/v [..., L, D], mask broadcastable to [..., Q, L] (True = attend); scores soft-capped
    (tanh(s / softcap) * softcap, transformers' eager rule) when `softcap` is given.
    A row with no visible key gets output 0 and lse -inf (it then weighs nothing in a merge)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = (s - m).exp()
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v.float()) / denom.clamp_min(torch.finfo(torch.float32).tiny)
    return o, (m + denom.log()).squeeze(-1)
