"""Translation on encoder-decoder models (Marian, BART, T5): one batched `model.generate` per step.

A simple batched runner for now (a later issue pages the decoder through the engine's KV blocks). Each
`step()`:
1. drops requests that expired (DeadlineExceeded) or were completed elsewhere;
2. tokenizes the requests added since the last step (truncating and reporting, or rejecting over-long input);
3. takes the head of the priority queue and the waiting requests that share its effective generation
   options (`GenerationKey`) -- a request with a seed always runs alone -- under the token budget (padded
   input tokens) and `max_running_requests` (counting beams: requests x num_beams);
4. pads them and calls `model.generate` once; completes each request with a `TranslateResult`.

The model's `generation_config` is the default; a request overrides only what it sets (max_new_tokens,
num_beams, sampling). With `attention_mask`, a padded batch gives what per-request `generate` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import InvalidRequest, UnsupportedLanguagePair
from shared.models import TranslateRequest, TranslateResult
from worker.engine._batching import (
    WaitingQueue,
    drop_finished,
    input_token_limit,
    order_key,
    pad_batch,
    pick_batch,
    too_long,
)
from worker.engine._generation import GenerationKey, generate_kwargs, generation_key, split_output
from worker.engine.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor


def _payload(request: EngineRequest) -> TranslateRequest:
    assert isinstance(request.payload, TranslateRequest)  # checked by `add`
    return request.payload


@dataclass
class _Encoded:
    inputs: dict[str, list[int]]
    truncated: bool
    key: GenerationKey

    @property
    def num_tokens(self) -> int:
        return len(self.inputs["input_ids"])


class Seq2SeqExecutor(ModelExecutor):
    """Runs `TranslateRequest`s on a `*ForConditionalGeneration` / `MarianMTModel` (module docstring)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        self.max_input_tokens = input_token_limit(loaded)
        self._input_names = [n for n in loaded.tokenizer.model_input_names if n != "token_type_ids"]
        self._new: list[tuple[EngineRequest, tuple[int, float, int]]] = []
        self._waiting: WaitingQueue[_Encoded] = WaitingQueue()
        self._counters = {"steps": 0, "num_requests_finished": 0, "generated_tokens": 0}

    # ---- the ModelExecutor interface ------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        payload, spec = request.payload, self.loaded.spec
        if not isinstance(payload, TranslateRequest):
            request.fail(InvalidRequest(f"{spec.name} translates text; got {request.task.value}"))
        elif not spec.serves_pair(payload.source_lang, payload.target_lang):
            request.fail(
                UnsupportedLanguagePair(
                    f"model {spec.name!r} does not translate {payload.source_lang or '*'} -> "
                    f"{payload.target_lang or '*'}; it serves {spec.languages}"
                )
            )
        else:
            self._new.append((request, order_key(request)))

    def abort(self, request_id: str, error: BaseException) -> bool:
        held = [req for req, _ in self._new if req.id == request_id]
        self._new = [(req, key) for req, key in self._new if req.id != request_id]
        held += [req for req in self._waiting.requests() if req.id == request_id]
        self._waiting.remove_request(request_id)
        for request in held:
            request.fail(error)
        return bool(held)

    def has_work(self) -> bool:
        return bool(self._new) or len(self._waiting) > 0

    def step(self) -> None:
        self._tokenize_new()
        drop_finished(self._waiting)
        batch = self._pick()
        if not batch:
            return
        self._waiting.remove_items([enc for _, enc in batch])
        key = batch[0][1].key
        rows = self._generate([enc for _, enc in batch], key)
        for (request, encoded), row in zip(batch, rows, strict=True):
            request.finish(self._result(row, encoded, key))
            self._counters["num_requests_finished"] += 1

    def stats(self) -> dict[str, float]:
        waiting = len(self._new) + len(self._waiting)
        return {"num_requests_running": 0, "num_requests_waiting": waiting, **self._counters}

    # ---- steps ------------------------------------------------------------------------------------
    def _tokenize_new(self) -> None:
        new, self._new = self._new, []
        if not new:
            return
        tokenizer, limit = self.loaded.tokenizer, self.max_input_tokens
        texts = [self._source_text(_payload(req)) for req, _ in new]
        full = tokenizer(texts, truncation=False, verbose=False)
        for i, (request, key) in enumerate(new):
            ids, truncated = full["input_ids"][i], False
            inputs = {name: full[name][i] for name in self._input_names if name in full}
            if len(ids) > limit:
                if not _payload(request).truncate:
                    request.fail(too_long(len(ids), limit, "text"))
                    continue
                cut = tokenizer(texts[i], truncation=True, max_length=limit)
                inputs, truncated = {name: cut[name] for name in inputs}, True
            gen_key = generation_key(_payload(request).generation, request.id, self.loaded.model)
            self._waiting.push(request, _Encoded(inputs, truncated, gen_key), key)

    def _source_text(self, payload: TranslateRequest) -> str:
        """The text as the model expects it: a `>>de<<` target token (multilingual Marian) or a T5 prefix."""
        tokenizer, config = self.loaded.tokenizer, self.loaded.model.config
        target = payload.target_lang
        if target and f">>{target}<<" in getattr(tokenizer, "supported_language_codes", ()):
            return f">>{target}<< {payload.text}"
        params = (getattr(config, "task_specific_params", None) or {}).get(
            f"translation_{payload.source_lang}_to_{target}", {}
        )
        return params.get("prefix", "") + payload.text

    def _pick(self) -> list[tuple[EngineRequest, _Encoded]]:
        """The head request and the waiting ones with the same generation key (see the module docstring)."""
        candidates = list(self._waiting)
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

    def _generate(self, batch: list[_Encoded], key: GenerationKey) -> list[list[int]]:
        """One `generate` call; returns each row's generated token ids (decoder start token removed)."""
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        inputs = pad_batch([enc.inputs for enc in batch], tokenizer, self.loaded.device)
        self._counters["steps"] += 1
        with torch.inference_mode(), torch.random.fork_rng(devices=self._rng_devices(), enabled=key.seeded):
            if key.seed is not None:
                torch.manual_seed(key.seed)
            sequences = model.generate(**inputs, **generate_kwargs(key, model))
        return [row[1:] for row in sequences.tolist()]  # row[0] is decoder_start_token_id

    def _rng_devices(self) -> list[int]:
        device = torch.device(self.loaded.device)
        return [device.index or 0] if device.type == "cuda" else []

    def _result(self, row: list[int], encoded: _Encoded, key: GenerationKey) -> TranslateResult:
        tokens, finish_reason = split_output(row, self.loaded.model, key.max_new_tokens)
        self._counters["generated_tokens"] += len(tokens)
        return TranslateResult(
            model=self.loaded.spec.name,
            translation=self.loaded.tokenizer.decode(tokens, skip_special_tokens=True),
            output_tokens=len(tokens),
            finish_reason=finish_reason,
            input_tokens=encoded.num_tokens,
            truncated=encoded.truncated,
        )
