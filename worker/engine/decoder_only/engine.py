"""LLMEngine: a synchronous, vLLM-like engine for one decoder-only model.

    engine = LLMEngine(model, tokenizer, EngineConfig(), namespace="llama-tiny")
    engine.add_request("r1", prompt_ids, SamplingParams(max_new_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():       # finished or updated requests
            ...

One `step()` = schedule (one token budget over decodes and prefill chunks) -> one packed forward
-> sample -> stop checks. Not thread-safe: one thread drives it (the worker's engine thread).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from pagedq.worker.engine.core.engine import PagedEngine
from pagedq.worker.engine.core.executor import EngineConfig
from pagedq.worker.engine.core.memory import free_device_memory
from pagedq.worker.engine.core.request import Request, RequestOutput, RequestStatus, TokenCallback, TokenSequence
from pagedq.worker.engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pagedq.worker.engine.core.stats import StepCounters
from pagedq.worker.engine.cpu.linear import prepare_for_host
from pagedq.worker.engine.cpu.quantization import quantization_summary
from pagedq.worker.engine.decoder_only.attention import PagedKVCache
from pagedq.worker.engine.decoder_only.runner import ModelRunner, ModelShape
from pagedq.worker.engine.decoder_only.self_check import UnsupportedModel, check_rotary, self_check
from pagedq.worker.engine.decoding.beam_search import BeamSearch
from pagedq.worker.engine.decoding.causal_options import check_generation_config
from pagedq.worker.engine.decoding.sampling import SamplingParams, StopChecker
from pagedq.worker.engine.decoding.step import Decoding
from pagedq.worker.engine.paged.block_pool import BlockPool
from pagedq.worker.engine.paged.kv_cache_manager import KVCacheManager, cdiv
from pagedq.worker.engine.paged.kv_dtype import resolve_kv_dtype

log = logging.getLogger(__name__)


def eos_token_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """EOS ids from the model's generation config, else its config, else the tokenizer."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if eos is not None else []


class LLMEngine(PagedEngine):
    """Paged-KV-cache continuous batching over an unmodified transformers causal LM.

    Memory: `num_blocks` if given, else `config.kv_cache_bytes`, else `kv_cache_memory_fraction` of
    the device's free memory -- capped at what `max_running_requests` requests of `max_model_len`
    tokens can use. The model's attention implementation is switched to the engine's.

    Tuning: `long_prefill_token_threshold` caps one request's prefill chunk per step (0: the budget);
    `decode_bucket_rows` decode rows share one padded attention batch; decode rows sharing a cached
    prefix of >= `cascade_min_tokens` attend to it once per group (0: off).

    Exact or refused (worker/engine/decoder_only/self_check.py): a model whose paged output would differ from
    transformers' raises `UnsupportedModel` here, with the reason, logged once -- statically (a
    generation_config field the engine does not implement, see `causal_options`; rotary scaling that
    depends on the step) or by the load-time probe (`self_check=False` skips the probe)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        namespace: str = "default",
        *,
        num_blocks: int | None = None,
        kv_cache_memory_fraction: float = 0.1,
        max_model_len: int | None = None,
        long_prefill_token_threshold: int = 0,
        decode_bucket_rows: int = 16,
        cascade_min_tokens: int = 256,
        native_decode: bool | None = None,
        self_check: bool = True,
    ) -> None:
        try:
            self._build(
                model, tokenizer, config, namespace, num_blocks, kv_cache_memory_fraction, max_model_len,
                long_prefill_token_threshold, decode_bucket_rows, cascade_min_tokens, native_decode,
            )  # fmt: skip
            if self_check:
                run_self_check(self)
        except UnsupportedModel as exc:
            log.warning("refusing model %s: %s", namespace, exc)
            raise

    def _build(
        self,
        model: Any,
        tokenizer: Any,
        config: EngineConfig | None,
        namespace: str,
        num_blocks: int | None,
        kv_cache_memory_fraction: float,
        max_model_len: int | None,
        long_prefill_token_threshold: int,
        decode_bucket_rows: int,
        cascade_min_tokens: int,
        native_decode: bool | None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer, self.namespace = model, tokenizer, namespace
        shape = ModelShape.of(model)
        self.max_model_len = max_model_len or shape.max_model_len
        check_generation_config(model)
        check_rotary(model, self.max_model_len)
        device, dtype = model.device, resolve_kv_dtype(config.kv_cache_dtype, model.dtype)
        per_block = PagedKVCache.bytes_per_block(
            shape.num_layers, config.block_size, shape.num_kv_heads, shape.head_dim, dtype
        )
        if num_blocks is None:
            budget = config.kv_cache_bytes or int(free_device_memory(device) * kv_cache_memory_fraction)
            num_blocks = budget // per_block
            if self.max_model_len:
                num_blocks = min(num_blocks, config.max_running_requests * cdiv(self.max_model_len, config.block_size))
        if num_blocks < 1:
            raise ValueError(f"KV budget too small: one block needs {per_block} bytes")
        self.cache = PagedKVCache(
            shape.num_layers, num_blocks, config.block_size, shape.num_kv_heads, shape.head_dim, dtype, device,
            compute_dtype=model.dtype,
        )  # fmt: skip
        self.kv = KVCacheManager(BlockPool(num_blocks), config.block_size, namespace, config.enable_prefix_caching)
        sched_config = SchedulerConfig(
            config.max_batch_tokens, config.max_running_requests, long_prefill_token_threshold
        )
        self.scheduler = Scheduler(sched_config, self.kv)
        prepare_for_host(model, config.cpu_prepack_linear)
        self.runner = ModelRunner(model, self.cache, decode_bucket_rows, cascade_min_tokens, native_decode)
        self.stop_checker = StopChecker(eos_token_ids(model, tokenizer), tokenizer, self.max_model_len)
        self.decoding = Decoding(self.kv, self.stop_checker, exact_log_softmax=quantization_summary(model) is None)
        self._beam_streams: dict[str, TokenCallback] = {}  # beam requests' token callbacks, called when they end
        self.counters = StepCounters()

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        priority: int = 0,
        on_token: TokenCallback | None = None,
    ) -> None:
        """Queue a request. `on_token(request_id, token_id)` streams every generated token as soon as it is
        sampled. (Deadlines are the caller's: the worker's engine loop aborts a request whose deadline passes.)"""
        params = sampling_params or SamplingParams()
        n = len(prompt_token_ids)
        if self.max_model_len is not None and n >= self.max_model_len:
            raise ValueError(f"prompt of {n} tokens does not fit max_model_len={self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        longest = min(n + params.max_new_tokens, self.max_model_len or n + params.max_new_tokens)
        if cdiv(longest, self.config.block_size) > self.kv.pool.num_blocks:
            raise ValueError(
                f"a request of {longest} tokens would not fit the KV pool ({self.kv.pool.num_blocks} blocks)"
            )
        if params.num_beams == 1:
            request = Request.decoder_only(request_id, list(prompt_token_ids), params, priority, on_token)
        else:
            request = self._beam_request(request_id, list(prompt_token_ids), params, priority, longest)
            if on_token is not None:
                self._beam_streams[request_id] = on_token
        self.scheduler.add_request(request)

    def _beam_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, priority: int,
        max_length: int,
    ) -> Request:
        """A beam-search request: `num_beams` seats from admission, generate's search over the prompt
        (`decoding.beam_search`; EOS: the engine's unless ignored, plus the stop tokens)."""
        if params.num_beams > self.config.max_running_requests:
            raise ValueError(f"num_beams={params.num_beams} exceeds max_running_requests")
        eos = () if params.ignore_eos else tuple(sorted(self.stop_checker.eos_token_ids))
        beam = BeamSearch(params.num_beams, params.length_penalty, params.early_stopping,
                          eos + params.stop_token_ids, max_length, prompt)  # fmt: skip
        request = Request(request_id, [TokenSequence(request_id, prompt, params)], priority,
                          seats=params.num_beams, beam=beam)  # fmt: skip
        need = self.kv.max_blocks(request, max_length)
        if need > self.kv.pool.num_blocks:
            raise ValueError(f"a beam request needing {need} KV blocks would not fit the pool "
                             f"({self.kv.pool.num_blocks} blocks)")  # fmt: skip
        return request

    def abort_request(self, request_id: str) -> bool:
        self._beam_streams.pop(request_id, None)
        return super().abort_request(request_id)

    # ---- the loop -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling step and (if anything is scheduled) one forward pass."""
        out = self.scheduler.schedule()
        outputs = [RequestOutput.of(r) for r in out.finished]
        for request in out.finished:  # aborted: no output to stream
            self._beam_streams.pop(request.request_id, None)
        if not out.requests:
            return outputs
        try:
            logits, sampled = self.runner.execute(out, self.kv.block_ids)
        except BaseException:
            self.kv.pool.reset_prefix_cache()  # blocks published for this step were never written
            raise
        self.scheduler.update_from_output(out)
        self.counters.step(out.total_num_tokens, len(sampled))
        for request, status in self._decode(out, logits, sampled):
            if status is not None:
                self.scheduler.finish_request(request, status)
            outputs.append(RequestOutput.of(request, self._text(request) if request.is_finished else None))
        return outputs

    def _decode(
        self, out: SchedulerOutput, logits: torch.Tensor, sampled: list[TokenSequence]
    ) -> list[tuple[Request, RequestStatus | None]]:
        """Next tokens of every request whose sequences' last tokens were computed in this step (`sampled`:
        the sequences of the logits rows, in row order): sampled requests and beam requests apart."""
        row_of = {id(seq): row for row, seq in enumerate(sampled)}
        samples: list[tuple[Request, int]] = []
        beams: list[tuple[Request, list[int]]] = []
        for request in out.requests:
            row = row_of.get(id(request.sequence))
            if row is None:
                continue  # a prompt chunk that is not its last
            if request.beam is None:
                samples.append((request, row))
            else:
                beams.append((request, [row_of[id(seq)] for seq in request.sequences]))
        return self.decoding.sample(samples, logits) + self.decoding.beams(beams, logits)

    def _text(self, request: Request) -> str | None:
        """A finished request's text; a beam request's tokens reach its stream only now (each step's beams
        are candidates, not output)."""
        stream = self._beam_streams.pop(request.request_id, None)
        if stream is not None:
            for token in request.output_token_ids:
                stream(request.request_id, token)
        return self.stop_checker.output_text(request.sequence, request.output_token_ids)

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order (for tests and benchmarks)."""
        return self._run_all(self.add_request, prompts, sampling_params)

    def reset_after_probe(self, request_ids: Sequence[str]) -> None:
        """Forget a probe's traces: its requests (if it stopped midway), cached blocks and counters."""
        for rid in request_ids:
            self.scheduler.abort_request(rid)
        self.scheduler.schedule()  # collects the aborted (reported, then forgotten); nothing runs
        self.kv.pool.reset_prefix_cache()
        self.kv.prefix_cache_queries = self.kv.prefix_cache_hits = 0
        self.scheduler.num_preemptions = 0
        self.reset_counters()


def run_self_check(engine: LLMEngine) -> None:
    """The load-time probe (a module-level name, so a test can count or replace it)."""
    self_check(engine)
