"""Attention within segments of a packed row, registered with transformers as `VARLEN_ATTENTION`.

A packed step holds several inputs in one row [1, T] (encoder/packing.py); each attends to itself only. The
step's `Segments` reach every attention call as the extra model keyword `SEGMENTS_KWARG`.

Segments are attended in groups of similar length, gathered into a padded batch only inside attention::

    segments (lengths)     A(250) B(230) C(210) D(40) E(36) F(33)          sorted longest first
    groups                 [A B C] padded to 250, key mask    [D E F] padded to 40, key mask
    per group              q/k/v rows gathered to [n, H, longest, D] -> one SDPA call -> rows put back in place

A segment joins the current group while it is at least `GROUP_MIN_SHARE` of the group's longest, so padding
adds at most (1 / 0.8)^2 = 1.56x to a group's attention FLOPs (1.2x on average for uniform lengths 8..256,
against 1.34x at 0.7 and 1.14x at 0.85), and a step of 64 such texts makes ~11 groups (8 at 0.7, 14 at 0.85)
however many segments there are. Why not one SDPA call per segment (no padding at all): on the 2-core CPU,
a BERT-base step of 8,192 tokens ran ~17% faster grouped, and bf16 per segment was 3x slower still; the
linear layers, where most FLOPs are, never see padding either way. Fewer, larger calls also matter on
shared cores: each parallel region waits for its slowest thread, and with other processes on the cores
that wait is a scheduler time slice (measured: 2 threads on 2 busy cores ran a packed forward several times
slower than 1 thread).

bf16 on an AMX CPU (one thread, BERT-base layer, 64 texts of 8..256 tokens = 9,217 tokens; 2026-12, torch
2.13, a loaded machine): 115 ms per layer when every group was upcast to fp32 and gathered per [T, H, D] row
(the copies cost more than SDPA), 65 ms in bf16 with one gather per input; 0.8 and 0.85 cost ~5-10% less
than 0.7 (less padding; the extra SDPA calls are cheap on one thread). SDPA itself is then ~85% of it, at
80-190 GFLOP/s depending on the group's length (the linear layers reach ~1,000): in a whole W3 forward on
one thread, SDPA is ~28% of the time, the linear layers ~48%.

bf16 on a CPU with AVX512-BF16 (`cpu/varlen_bf16.py`): torch's SDPA runs bf16 no faster than fp32 there
without AMX, so bf16 q/k/v go to a native kernel that attends each segment at its own length with the CPU's bf16
dot products (no groups, no padding; 99.9% of its outputs equal SDPA's bit for bit, the rest in the last bits):
W3's BERT-base bf16 step spent ~20% in attention with SDPA, ~8-10% with the kernel. fp32 keeps SDPA.

No attention mask inside a packed forward: the model's mask builder asks the registered mask function, and
`varlen_mask` answers None while `packed_forward()` is on (the engine's packed calls), since attention here
reads each segment's bounds from `Segments` and never the mask. transformers would otherwise build its
block-diagonal packed-sequence mask [T, T] from the reset position ids at every forward (per step of the demo
classifier, 7 texts, ~0.27 ms of a ~3.5 ms step; 1.7% of W3's int8 run). Unpacked callers get `sdpa_mask`.

Invariants: groups cover every token of the row exactly once; a group's mask is None when it has no padding;
`gather[take]` is 0, 1, ..., T - 1 (each token's output is read back from its own slot).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pagedq.worker.engine.cpu import varlen_bf16

VARLEN_ATTENTION = "pagedq_varlen"  # our name in transformers' attention registry (not the paged decoder's)
SEGMENTS_KWARG = "pagedq_segments"  # the model keyword that carries a step's `Segments`
GROUP_MIN_SHARE = 0.8  # a segment joins a group while its length >= this share of the group's longest


def _native_half_dtypes() -> frozenset[torch.dtype]:
    """Half-precision dtypes this CPU computes natively (AVX512-BF16 / AMX-BF16, AVX512-FP16 / AMX-FP16)."""
    try:
        flags = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # a torch without the query: treat half precision as emulated
        return frozenset()
    native = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
    return frozenset(dtype for dtype, names in native.items() if any(flags.get(name) for name in names))


#: SDPA runs in these dtypes on CPU as given; other half precision is upcast to fp32 per group (emulated bf16
#: SDPA on an AVX2-only CPU is several times slower than fp32).
CPU_NATIVE_HALF = _native_half_dtypes()


@dataclass(frozen=True)
class AttentionGroup:
    """Segments attended in one SDPA call: `size` segments padded to `longest` slots each."""

    size: int
    longest: int
    offset: int  # its first slot in the step's slot order (`Segments.gather`)
    slots: torch.Tensor  # [size * longest] packed row of every slot (row 0 where the slot is padding)
    real: torch.Tensor  # [size * longest] bool: the slot holds a token
    rows: torch.Tensor  # packed rows of the real slots, in slot order
    key_mask: torch.Tensor | None  # [size, 1, 1, longest] True for real keys; None without padding


@dataclass(frozen=True)
class Segments:
    """A step's packing: segment i holds tokens [starts[i], starts[i] + lengths[i]) of the packed row.

    `gather` [slots]: the packed row of every slot of every group, groups in order; `take` [T]: where each
    packed row's token sits in that slot order (so `gather[take]` is 0, 1, ..., T - 1)."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    groups: tuple[AttentionGroup, ...]
    gather: torch.Tensor
    take: torch.Tensor

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: Any = "cpu") -> Segments:
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        groups, take = _group(starts, lengths)
        gather = torch.cat([g.slots for g in groups]) if len(groups) > 1 else groups[0].slots
        device = torch.device(device)
        if device.type != "cpu":
            groups = tuple(_to(g, device) for g in groups)
        return cls(tuple(starts), tuple(lengths), groups, gather.to(device), take.to(device))

    @cached_property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`starts` and `lengths` as int64 CPU tensors (the native bf16 kernel's arguments)."""
        return torch.tensor(self.starts, dtype=torch.int64), torch.tensor(self.lengths, dtype=torch.int64)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def padding_slots(self) -> int:
        """Slots of all groups that hold no token."""
        return len(self.gather) - self.num_tokens

    def split(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Per-segment views of a per-token tensor [T, ...]."""
        return list(packed.split(self.lengths))


def _group(starts: Sequence[int], lengths: Sequence[int]) -> tuple[tuple[AttentionGroup, ...], torch.Tensor]:
    """The groups, and `take` (see `Segments`). Index arithmetic in numpy, one tensor per array at the end: a
    handful of small torch ops per group cost ~260 us per step of 7 texts in the engine thread."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    members: list[list[int]] = []
    for i in order:
        if not members or lengths[i] < GROUP_MIN_SHARE * lengths[members[-1][0]]:
            members.append([])
        members[-1].append(i)
    groups, offset = [], 0
    take = np.empty(sum(lengths), dtype=np.int64)
    for segment_ids in members:
        longest = lengths[segment_ids[0]]
        offsets = np.arange(longest, dtype=np.int64)
        real = offsets[None, :] < np.array([lengths[i] for i in segment_ids], dtype=np.int64)[:, None]  # [size, L]
        slots = np.where(real, np.array([starts[i] for i in segment_ids], dtype=np.int64)[:, None] + offsets, 0)
        rows = slots[real]
        take[rows] = offset + np.flatnonzero(real)
        mask = None if bool(real.all()) else torch.from_numpy(real)[:, None, None, :]
        groups.append(AttentionGroup(len(segment_ids), longest, offset, torch.from_numpy(slots.ravel()),
                                     torch.from_numpy(real.ravel()), torch.from_numpy(rows), mask))  # fmt: skip
        offset += real.size
    return tuple(groups), torch.from_numpy(take)


def _to(group: AttentionGroup, device: torch.device) -> AttentionGroup:
    mask = None if group.key_mask is None else group.key_mask.to(device)
    return AttentionGroup(group.size, group.longest, group.offset, group.slots.to(device), group.real.to(device),
                          group.rows.to(device), mask)  # fmt: skip


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q/k/v [1, H, T, D] -> out [1, T, H, D], attention within segments.

    bf16 q/k/v that the native kernel reads (`varlen_bf16.usable`) go there whole; otherwise, as follows.

    Runs in the inputs' dtype where the CPU computes it natively (`CPU_NATIVE_HALF`): bf16 on AMX stays
    bf16, as SDPA's CPU kernel keeps scores, softmax and the output's sums in fp32 internally. A layer costs
    one `index_select` per input (every group's slots at once, rows of H * D values), one SDPA call per group
    on views of those, one `cat` of the outputs and one `index_select` back to packed order: few parallel
    regions, which matters on shared cores (each region waits for its slowest thread). Without
    `SEGMENTS_KWARG` this is transformers' SDPA attention, mask and all (unpacked callers)."""
    segments: Segments | None = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    assert query.shape[0] == 1 and query.shape[2] == segments.num_tokens, "packed batches are one row"
    assert key.shape[1] == query.shape[1], "encoder attention: as many key/value heads as query heads"
    heads, head_dim = query.shape[1], query.shape[3]
    if dropout == 0.0 and varlen_bf16.usable(query, key, value):  # bf16 on AVX512-BF16: no groups, no padding
        starts, lengths = segments.bounds
        scale = head_dim**-0.5 if scaling is None else scaling
        return varlen_bf16.varlen_attention_bf16(query, key, value, starts, lengths, scale).unsqueeze(0), None
    upcast = query.device.type == "cpu" and query.dtype not in (torch.float32, *CPU_NATIVE_HALF)
    tokens, width = segments.num_tokens, heads * head_dim
    slotted = [  # [slots, H * D] each; reshape is a view when the projection's output is contiguous
        t[0].transpose(0, 1).reshape(tokens, width).index_select(0, segments.gather) for t in (query, key, value)
    ]
    outputs = []
    for group in segments.groups:
        end = group.offset + group.size * group.longest
        q, k, v = (t[group.offset : end].view(group.size, group.longest, heads, head_dim).transpose(1, 2)
                   for t in slotted)  # fmt: skip
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=group.key_mask, dropout_p=dropout, scale=scaling)
        outputs.append(attended.transpose(1, 2).reshape(-1, width))
    out = (torch.cat(outputs) if len(outputs) > 1 else outputs[0]).index_select(0, segments.take)
    return out.to(query.dtype).view(1, tokens, heads, head_dim), None


_PACKED: ContextVar[bool] = ContextVar("pagedq_packed_forward", default=False)


@contextmanager
def packed_forward() -> Iterator[None]:
    """Around a forward whose every attention call gets `SEGMENTS_KWARG`: no mask is built for it."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' mask for `VARLEN_ATTENTION`: None inside `packed_forward()`, else `sdpa_mask`'s."""
    return None if _PACKED.get() else sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> None:
    """Make `VARLEN_ATTENTION` a valid attention implementation (idempotent; registries are global)."""
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
