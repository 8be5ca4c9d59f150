"""The batched-`generate` fallback for translations the paged engine cannot run.

Used for architectures outside `seq2seq_model.PAGED_MODEL_TYPES` and for requests whose effective
generation config sets an option the engine does not implement (`seq2seq_options.unsupported_options`,
e.g. `repetition_penalty` or beam sampling). Each `step()`:

1. drops requests that expired (DeadlineExceeded) or were completed elsewhere;
2. takes the head of the priority queue and the waiting requests that share its effective options
   (`GenerationKey`) -- a request with a seed always runs alone -- under the token budget (padded input
   tokens) and `max_running_requests` (counting beams: requests x num_beams);
3. pads them and calls `model.generate` once; returns each request's generated token ids.

With `attention_mask`, a padded batch gives what per-request `generate` gives.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel
from pagedq.worker.engine.decoding.sampling import DEFAULT_GENERATOR_LOCK
from pagedq.worker.engine.decoding.seq2seq_options import GenerationKey, generate_kwargs
from pagedq.worker.engine.tasks.batching import WaitingQueue, drop_finished, lookahead, pad_batch, pick_batch


@dataclass
class EncodedText:
    """A tokenized source text and how it is to be generated."""

    inputs: dict[str, list[int]]  # input_ids (+ attention_mask)
    truncated: bool
    key: GenerationKey

    @property
    def num_tokens(self) -> int:
        return len(self.inputs["input_ids"])


class GenerateBatcher:
    """Waiting requests and one batched `generate` per `step()` (module docstring)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        model_as_loaded: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        """`model_as_loaded()` wraps each `generate` (the paged engine switches the attention back)."""
        self.loaded, self.config = loaded, config
        self.model_as_loaded = model_as_loaded
        self.waiting: WaitingQueue[EncodedText] = WaitingQueue()
        self.steps = 0

    def __len__(self) -> int:
        return len(self.waiting)

    def push(self, request: EngineRequest, encoded: EncodedText, order: tuple[int, float, int]) -> None:
        self.waiting.push(request, encoded, order)

    def remove(self, request_id: str) -> bool:
        return bool(self.waiting.remove_request(request_id))

    def step(self) -> list[tuple[EngineRequest, EncodedText, list[int]]]:
        """One `generate` call; returns (request, encoded, generated token ids) for each request in it."""
        drop_finished(self.waiting, head=lookahead(self.config.max_running_requests))
        batch = self._pick()
        if not batch:
            return []
        self.waiting.remove_items([enc for _, enc in batch])
        rows = self._generate([enc for _, enc in batch], batch[0][1].key)
        return [(request, enc, row) for (request, enc), row in zip(batch, rows, strict=True)]

    def _pick(self) -> list[tuple[EngineRequest, EncodedText]]:
        candidates = self.waiting.head(lookahead(self.config.max_running_requests))
        if not candidates:
            return []
        key = candidates[0][1].key
        same = [c for c in candidates if c[1].key == key]
        return pick_batch(
            same,
            length=lambda enc: enc.num_tokens,
            max_tokens=self.config.max_batch_tokens,
            max_items=max(1, self.config.max_running_requests // key.num_beams),
        )

    def _generate(self, batch: list[EncodedText], key: GenerationKey) -> list[list[int]]:
        """One `generate` call; each row's generated token ids (decoder start token removed)."""
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        inputs = pad_batch([enc.inputs for enc in batch], tokenizer, self.loaded.device)
        self.steps += 1
        device = torch.device(self.loaded.device)
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with (
            # draws from (or reseeds) torch's process-wide generators: one engine thread at a time
            DEFAULT_GENERATOR_LOCK if key.do_sample or key.seeded else nullcontext(),
            self.model_as_loaded(),
            torch.inference_mode(),
            torch.random.fork_rng(devices=rng_devices, enabled=key.seeded),
        ):
            if key.seed is not None:
                torch.manual_seed(key.seed)
            sequences = model.generate(**inputs, **generate_kwargs(key, model))
        return [row[1:] for row in sequences.tolist()]  # row[0] is decoder_start_token_id
