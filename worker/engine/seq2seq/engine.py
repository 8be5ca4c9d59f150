"""Seq2SeqEngine: continuous batching of encoder-decoder requests over paged self- and cross-attention KV.

    engine = Seq2SeqEngine(model, EngineConfig())
    engine.add_request("r1", encoder_ids, decode_settings(model, GenerationOptions()))
    while engine.has_unfinished_requests():
        for out in engine.step():          # finished requests
            ...

One `step()` = schedule (one token budget over encoder passes and decoder rows) -> the runner's encoder
pass for newly admitted requests and one packed decoder pass for every running sequence -> next tokens
(`decoding.step`: generate's processors, then greedy / sampling, and one beam step for all beam
requests at once, `beam_search.step_beams`, whose new beams fork their parents' blocks) and stop checks;
finished requests free their blocks at once. The model's dtype runs end to end (bf16: pool, attention,
logits; beam scores are fp32, as generate keeps them). Not thread-safe: one thread drives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pagedq.worker.engine.core.engine import PagedEngine
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.core.memory import free_device_memory
from pagedq.worker.engine.core.request import Request, RequestOutput
from pagedq.worker.engine.core.scheduler import Scheduler, SchedulerConfig
from pagedq.worker.engine.core.stats import StepCounters
from pagedq.worker.engine.cpu.linear import prepare_for_host
from pagedq.worker.engine.cpu.quantization import quantization_summary
from pagedq.worker.engine.decoding.beam_search import BeamSearch
from pagedq.worker.engine.decoding.seq2seq_options import DecodeSettings
from pagedq.worker.engine.decoding.step import Decoding
from pagedq.worker.engine.paged.block_pool import BlockPool
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager, cdiv
from pagedq.worker.engine.paged.kv_dtype import resolve_kv_dtype
from pagedq.worker.engine.seq2seq.attention import KVPool
from pagedq.worker.engine.seq2seq.model import DecoderShape, check_model
from pagedq.worker.engine.seq2seq.runner import Seq2SeqRunner, StepItem


class Seq2SeqEngine(PagedEngine):
    """Paged continuous batching over an unmodified transformers encoder-decoder model.

    Memory: `num_blocks` if given, else `config.kv_cache_bytes`, else `kv_cache_memory_fraction` of the
    device's free memory -- capped at what `max_running_requests` sequences could ever use.
    `native_decode`: see `Seq2SeqRunner` (None: the native kernel wherever it applies).

    Raises `UnsupportedArchitecture` (before touching the model) for a model it cannot page;
    `close()` gives the model back as loaded."""

    #: called after every decoder pass with the step's requests and their logits rows (the self-check)
    observe_logits: Callable[[Sequence[Request], torch.Tensor], None] | None = None

    def __init__(
        self,
        model: Any,
        config: EngineConfig | None = None,
        *,
        num_blocks: int | None = None,
        kv_cache_memory_fraction: float = 0.1,
        max_encoder_len: int = 512,
        native_decode: bool | None = None,
    ) -> None:
        check_model(model)  # first: raises nothing but UnsupportedArchitecture, changes nothing
        self.config = config = config or EngineConfig()
        self.model = model
        prepare_for_host(model, config.cpu_prepack_linear)
        shape = DecoderShape.of(model)
        bs, dtype, device = config.block_size, resolve_kv_dtype(config.kv_cache_dtype, model.dtype), model.device
        per_block = KVPool.bytes_per_block(shape.num_layers, bs, shape.num_heads, shape.head_dim, dtype)
        if num_blocks is None:
            budget = config.kv_cache_bytes or int(free_device_memory(device) * kv_cache_memory_fraction)
            longest = cdiv(max_encoder_len, bs) + cdiv(shape.max_positions or 1024, bs)
            num_blocks = min(budget // per_block, config.max_running_requests * longest)
        if num_blocks < 1:
            raise ValueError(f"KV budget too small: one block needs {per_block} bytes")
        self.pool = shape.pool(num_blocks, bs, dtype, device, compute_dtype=model.dtype)
        self.kv = KVCacheManager(
            BlockPool(num_blocks, enable_caching=False), bs, enable_caching=False, encoder_block_size=bs
        )
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_tokens, config.max_running_requests), self.kv)
        self.runner = Seq2SeqRunner(model, self.pool, native_decode)
        self.decoding = Decoding(self.kv, exact_log_softmax=quantization_summary(model) is None)
        self.counters = StepCounters()

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        encoder_ids: Sequence[int],
        settings: DecodeSettings,
        priority: int = 0,
    ) -> None:
        """Queue a request; ValueError if it can never fit. (Deadlines are the caller's: the worker's engine loop
        aborts a request whose deadline passes.)"""
        if not encoder_ids:
            raise ValueError(f"request {request_id!r} has no input tokens")
        start = [settings.decoder_start_token_id]
        sequence = self.decoding.new_sequence(request_id, settings.sampling_params, start, start)
        request = Request(request_id, [sequence], priority, list(encoder_ids), settings, settings.num_beams)
        need, have = self.kv.max_blocks(request, settings.max_length), self.kv.pool.num_blocks
        if need > have:
            raise ValueError(f"a request needing {need} KV blocks would not fit the pool ({have} blocks)")
        if settings.num_beams > self.config.max_running_requests:
            raise ValueError(f"num_beams={settings.num_beams} exceeds max_running_requests")
        if settings.is_beam_search:
            request.beam = BeamSearch.for_settings(settings, start)
        self.scheduler.add_request(request)

    # ---- the loop -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling step and (if anything is scheduled) one encoder + decoder pass."""
        plan = self.scheduler.schedule()
        outputs = [RequestOutput.of(r) for r in plan.finished]
        if not plan.requests:
            return outputs
        items = [self._item(r) for r in plan.requests]
        logits = self.runner.execute(items, plan.copies)
        if self.observe_logits is not None:
            self.observe_logits(plan.requests, logits)
        self.scheduler.update_from_output(plan)
        sampled: list[tuple[Request, int]] = []
        beams: list[tuple[Request, list[int]]] = []
        row = 0
        for request in plan.requests:
            n = len(request.sequences)
            if request.beam is None:
                sampled.append((request, row))
            else:
                beams.append((request, list(range(row, row + n))))
            row += n
        finished = self.decoding.sample(sampled, logits) + self.decoding.beams(beams, logits)
        stepped_at = time.monotonic()
        for request in plan.requests:
            if request.first_token_at is None:
                request.first_token_at = stepped_at
        self.counters.step(plan.total_num_tokens, len(finished))
        for request, status in finished:
            if status is not None:
                self.scheduler.finish_request(request, status)
                outputs.append(RequestOutput.of(request))
        return outputs

    def generate(
        self, inputs: Sequence[Sequence[int]], settings: DecodeSettings | Sequence[DecodeSettings]
    ) -> list[RequestOutput]:
        """Run inputs to completion; outputs in input order (for tests and benchmarks)."""
        return self._run_all(self.add_request, inputs, settings)

    def close(self) -> None:
        """Give the model back as loaded (`Seq2SeqRunner.close`); the engine is unusable after."""
        self.runner.close()

    # ---- internals ----------------------------------------------------------------------------

    def _item(self, request: Request) -> StepItem:
        encode = not request.encoded
        if encode:
            self.counters.encoded_tokens += request.encoder_len
        return StepItem(
            sequences=request.sequences,
            self_blocks=[self.kv.block_ids(seq.seq_id) for seq in request.sequences],
            cross_blocks=[b.block_id for b in request.encoder_blocks],
            encoder_len=request.encoder_len,
            encoder_ids=request.encoder_ids if encode else None,
        )
