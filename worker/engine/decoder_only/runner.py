"""Model runner: turns a `SchedulerOutput` into one packed forward pass and returns the logits rows.

The batch is `input_ids[1, T]` with per-request `position_ids[1, T]` (restarting at each request's
computed length); the linear layers see exactly T rows, no padding. Rows are ordered with the
single-token rows (decodes) first, so the attention function can batch them, then one segment per
multi-token chunk. Only rows that sample a token (a request's last known token) reach the LM head,
via `logits_to_keep` as a LongTensor.

Traps this avoids (transformers 5.x): `use_cache=False` (otherwise a packed batch gives silently
wrong logits); `cache=` (not `past_key_values`); `set_attn_implementation` changes the model's
config, which is shared by every model built from the same config object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from pagedq.worker.engine.core.hf_compat import cache_kwargs
from pagedq.worker.engine.core.request import TokenSequence
from pagedq.worker.engine.core.scheduler import SchedulerOutput
from pagedq.worker.engine.cpu.native import use_native_decode
from pagedq.worker.engine.decoder_only.attention import (
    ATTENTION_NAME,
    METADATA_KWARG,
    AttentionMetadata,
    PagedKVCache,
    PrefillSegment,
    paged_attention,
)
from pagedq.worker.engine.decoder_only.self_check import UnsupportedModel
from pagedq.worker.engine.paged.decode_plan import plan_decode

AttentionInterface.register(ATTENTION_NAME, paged_attention)

BlockIdsFn = Callable[[str], list[int]]


@dataclass(frozen=True)
class ModelShape:
    """What the KV pool needs to know about a decoder-only model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int | None

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        max_len = getattr(config, "max_position_embeddings", None)
        return cls(config.num_hidden_layers, kv_heads, head_dim, max_len)


def check_model(model: Any) -> None:
    """Raise `UnsupportedModel` unless `model` is a decoder-only model that can run on a custom attention
    backend (the rest of "exact or refused" is worker/engine/decoder_only/self_check.py)."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModel(
            f"{type(model).__name__} is an encoder-decoder model; the paged engine runs decoder-only LMs"
        )
    if not model.is_backend_compatible():
        raise UnsupportedModel(
            f"{type(model).__name__} does not support custom attention backends (is_backend_compatible() is False)"
        )


class ModelRunner:
    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        decode_bucket_rows: int = 16,
        cascade_min_tokens: int = 256,
        native_decode: bool | None = None,
    ) -> None:
        """`decode_bucket_rows`: decode rows per padded batch; `cascade_min_tokens`: shortest shared
        prefix worth attending once for its whole group (0 disables shared-prefix attention);
        `native_decode`: decode rows through the native kernel (None: wherever it applies, i.e. an fp32
        or bf16 pool on CPU with the kernel built; False: always the portable gather + SDPA path)."""
        check_model(model)
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.device = cache.key_cache.device
        self.decode_bucket_rows = decode_bucket_rows
        self.cascade_min_blocks = -(-cascade_min_tokens // self.block_size) if cascade_min_tokens > 0 else 0
        self.native_decode = use_native_decode(cache.key_cache, native_decode)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_ids: BlockIdsFn) -> tuple[torch.Tensor, list[TokenSequence]]:
        """Run one step. Returns logits [N, vocab] in the model's dtype (no fp32 copy of a bf16 model's rows:
        the sampler upcasts only what it processes or samples from) and the N sequences that sample, in order
        (a sequence samples when its last token is computed in this step)."""
        self.cache.copy_blocks(out.copies)
        input_ids, positions, keep, samplers, meta = self._prepare(out, block_ids)
        self.cache.step_metadata = meta  # for layers that call cache.update() without their kwargs
        try:
            result = self.model(
                input_ids=input_ids,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=keep,
                **cache_kwargs(self.model, self.cache),
                **{METADATA_KWARG: meta},
            )
        finally:
            self.cache.step_metadata = None
        return result.logits[0], samplers

    def _prepare(
        self, out: SchedulerOutput, block_ids: BlockIdsFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[TokenSequence], AttentionMetadata]:
        bs = self.block_size
        pairs = list(zip(out.sequences, out.rows, strict=True))
        decode = [r for r, n in pairs if n == 1]
        chunks = [(r, n) for r, n in pairs if n > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        samplers: list[TokenSequence] = []

        tables = [block_ids(r.seq_id) for r in decode]
        plan = plan_decode(decode, tables, bs, self.decode_bucket_rows, self.cascade_min_blocks, self.device)
        for row, i in enumerate(plan.order):
            r, table, p = decode[i], tables[i], decode[i].num_computed_tokens
            ids.append(r.all_token_ids[p])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            if p + 1 == r.num_tokens:
                keep.append(row)
                samplers.append(r)

        segments = []
        row = len(decode)
        for r, n in chunks:
            p0 = r.num_computed_tokens
            table = block_ids(r.seq_id)
            ids.extend(r.all_token_ids[p0 : p0 + n])
            pos.extend(range(p0, p0 + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(p0, p0 + n))
            seg_blocks = torch.tensor(table, device=self.device) if p0 > 0 else None
            segments.append(PrefillSegment(row, row + n, p0, seg_blocks))
            row += n
            if p0 + n == r.num_tokens:
                keep.append(row - 1)
                samplers.append(r)

        dev = self.device
        meta = AttentionMetadata(
            cache=self.cache,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            decode_buckets=plan.buckets,
            decode_block_ids=torch.tensor(plan.block_ids, dtype=torch.long, device=dev),
            cascades=plan.cascades,
            prefills=segments,
        )
        if self.native_decode and decode:
            meta.decode_table_start = torch.tensor(plan.table_start, dtype=torch.long, device=dev)
            meta.decode_context_lens = torch.tensor(plan.context_lens, dtype=torch.long, device=dev)
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        positions = torch.tensor([pos], dtype=torch.long, device=dev)
        keep_rows = torch.tensor(keep, dtype=torch.long, device=dev)
        return input_ids, positions, keep_rows, samplers, meta
