"""Where each single-token (decode) row goes in a step: its row order, bucket, and shared-prefix group.

The runner puts decode rows first in the packed batch, in the order planned here::

    rows: [ plain rows, sorted by length, in buckets of <= bucket_rows | group A rows | group B rows ]
                                                                        share prefix A  share prefix B

All block tables the attention layers gather (plain rows' tables, groups' suffix tables) go into one
flat list, padded per bucket with block 0 (masked out), so each layer gathers once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedq.worker.engine.core.request import TokenSequence
from pagedq.worker.engine.decoder_only.attention import DecodeBucket
from pagedq.worker.engine.decoder_only.cascade import CascadeGroup, find_shared_prefixes


@dataclass
class DecodePlan:
    order: list[int]  # indices into the caller's decode requests, in row order
    buckets: list[DecodeBucket]
    cascades: list[CascadeGroup]
    block_ids: list[int]  # flat, padded block tables of every bucket and every group's suffix
    table_start: list[int]  # per row (in row order): where its table begins in `block_ids`
    context_lens: list[int]  # per row: keys it attends to in its table (a group's rows: after the prefix)


def plan_decode(
    requests: list[TokenSequence],
    tables: list[list[int]],
    block_size: int,
    bucket_rows: int,
    cascade_min_blocks: int,
    device: torch.device,
) -> DecodePlan:
    """Group rows that share >= `cascade_min_blocks` prefix blocks (0: never), bucket the others."""
    groups = find_shared_prefixes(tables, cascade_min_blocks) if cascade_min_blocks > 0 else []
    grouped = {i for rows, _ in groups for i in rows}
    plain = sorted((i for i in range(len(requests)) if i not in grouped), key=lambda i: requests[i].num_computed_tokens)
    plan = DecodePlan([], [], [], [], [], [])
    for start in range(0, len(plain), bucket_rows):
        rows = plain[start : start + bucket_rows]
        plan.buckets.append(_bucket(plan, requests, [tables[i] for i in rows], rows, 0, device))
    for rows, shared in groups:
        suffix = _bucket(plan, requests, [tables[i][shared:] for i in rows], rows, shared * block_size, device)
        prefix = torch.tensor(tables[rows[0]][:shared], dtype=torch.long, device=device)
        positions = torch.tensor([requests[i].num_computed_tokens for i in rows], dtype=torch.long, device=device)
        plan.cascades.append(CascadeGroup(prefix, suffix, positions))
    return plan


def _bucket(
    plan: DecodePlan,
    requests: list[TokenSequence],
    tables: list[list[int]],
    rows: list[int],
    offset: int,
    device: torch.device,
) -> DecodeBucket:
    """Append rows (and their padded tables) to the plan; context lengths count from `offset` tokens."""
    width = max(len(t) for t in tables)
    lens = [requests[i].num_computed_tokens + 1 - offset for i in rows]
    bucket = DecodeBucket(
        len(plan.order),
        len(plan.order) + len(rows),
        len(plan.block_ids),
        torch.tensor(lens, dtype=torch.long, device=device),
        width,
    )
    plan.order.extend(rows)
    plan.table_start.extend(len(plan.block_ids) + i * width for i in range(len(rows)))
    plan.context_lens.extend(lens)
    plan.block_ids.extend(b for t in tables for b in (t + [0] * (width - len(t))))
    return bucket
