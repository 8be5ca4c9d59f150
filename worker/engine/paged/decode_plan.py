"""Where each single-token (decode) row goes in a step, for both generative architectures.

`flat_tables` lays the block tables of rows the native kernel reads end to end (each row: where its table
starts); `padded_tables` pads a bucket's tables to its longest (block 0, masked out) for a batched gather.
The encoder-decoder runner keeps its rows where they are and buckets them by length (`sorted_buckets`); the
decoder-only runner plans its own order (`plan_decode`), putting decode rows first in the packed batch::

    rows: [ plain rows, sorted by length, in buckets of <= bucket_rows | group A rows | group B rows ]
                                                                        share prefix A  share prefix B

All block tables the attention layers gather (plain rows' tables, groups' suffix tables) go into one
flat list, padded per bucket with block 0 (masked out), so each layer gathers once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagedq.worker.engine.core.request import TokenSequence
from pagedq.worker.engine.decoder_only.attention import DecodeBucket
from pagedq.worker.engine.decoder_only.cascade import CascadeGroup, find_shared_prefixes

DecodeRow = tuple[int, int, Sequence[int]]  # (packed row, keys it attends to, its block table)


def flat_tables(tables: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Block tables end to end, and where each begins (the native kernel's `block_ids`, `table_start`)."""
    flat: list[int] = []
    starts: list[int] = []
    for table in tables:
        starts.append(len(flat))
        flat.extend(table)
    return flat, starts


def padded_tables(tables: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Tables padded with block 0 to the longest, flattened, and that width."""
    width = max(len(t) for t in tables)
    return [b for t in tables for b in (*t, *[0] * (width - len(t)))], width


def sorted_buckets(rows: Sequence[DecodeRow], bucket_rows: int) -> list[list[DecodeRow]]:
    """Rows in buckets of at most `bucket_rows`, by context length (similar lengths share a bucket's padding)."""
    ordered = sorted(rows, key=lambda r: r[1])
    return [ordered[i : i + bucket_rows] for i in range(0, len(ordered), bucket_rows)]


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
    flat, width = padded_tables(tables)
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
    plan.block_ids.extend(flat)
    return bucket
