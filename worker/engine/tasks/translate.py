"""Translation on encoder-decoder models: the paged `Seq2SeqEngine` (`seq2seq_model.PAGED_MODEL_TYPES`) or `generate`.

At load the executor picks the model's path (`stats()["path"]`, with `"path_reason"`): the paged engine if
the architecture is one it pages (`seq2seq_model.check_model`) and the engine passes its self-check against
the model's own forward (`seq2seq.self_check`); otherwise every request runs on the batched-`generate`
fallback, which is transformers' own generate and so exact by construction. A model that is not an
encoder-decoder is refused (`ModelError`). Nothing about an unknown architecture stops the worker.

Each `step()`:
1. tokenizes the requests added since the last step, grouped by source language (multilingual
   tokenizers keep it as state), truncating and reporting, or rejecting over-long input;
2. hands each to the paged engine -- or, for an architecture the engine cannot page or options it does
   not implement, to the batched-`generate` fallback (`seq2seq.generate_fallback`);
3. runs one engine step (an encoder pass for newly admitted requests plus one packed decoder pass for
   every running sequence) and, if the fallback holds work, one `generate` batch;
4. completes finished requests with a `TranslateResult`.

The model's `generation_config` is the default; a request overrides only what it sets. Languages select
the model (registry) and, within it, the target token or prefix (`seq2seq.languages`).

Invariants: only the engine thread calls this; each request's future completes exactly once (result,
the error given to `abort`, `DeadlineExceeded`, or `InvalidRequest`/`UnsupportedLanguagePair` at
tokenization); `abort` frees the request's KV blocks before it returns.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from itertools import groupby
from typing import Literal

from pagedq.shared.errors import InvalidRequest, ModelError, PagedqError, UnsupportedLanguagePair
from pagedq.shared.models import TranslateRequest, TranslateResult
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor, ModelStats
from pagedq.worker.engine.core.request import RequestOutput
from pagedq.worker.engine.decoding.seq2seq_options import (
    decode_settings,
    generation_key,
    split_output,
    unknown_request_options,
    unsupported_options,
)
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine
from pagedq.worker.engine.seq2seq.generate_fallback import EncodedText, GenerateBatcher
from pagedq.worker.engine.seq2seq.languages import Languages, resolve_languages
from pagedq.worker.engine.seq2seq.model import UnsupportedArchitecture
from pagedq.worker.engine.seq2seq.self_check import self_check
from pagedq.worker.engine.tasks.batching import Arrivals, input_token_limit, lookahead, order_key, too_long

log = logging.getLogger(__name__)


def _payload(request: EngineRequest) -> TranslateRequest:
    assert isinstance(request.payload, TranslateRequest)  # checked by `add`
    return request.payload


class Seq2SeqExecutor(ModelExecutor):
    """Runs `TranslateRequest`s on a `*ForConditionalGeneration` / `MarianMTModel` (module docstring)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        self.max_input_tokens = input_token_limit(loaded)
        self._input_names = [n for n in loaded.tokenizer.model_input_names if n != "token_type_ids"]
        self._new = Arrivals()  # added, not yet tokenized
        self._paged: dict[str, tuple[EngineRequest, EncodedText]] = {}
        if not getattr(getattr(loaded.model, "config", None), "is_encoder_decoder", False):
            raise ModelError(f"model {loaded.spec.name!r} ({type(loaded.model).__name__}) is not an encoder-decoder")
        self.engine, self.path_reason = self._paged_engine(config)
        as_loaded = self.engine.runner.original_attention_implementation if self.engine else nullcontext
        self.fallback = GenerateBatcher(loaded, config, as_loaded)
        self._counters = {"num_requests_finished": 0, "generated_tokens": 0, "num_fallback_requests": 0}

    def _paged_engine(self, config: EngineConfig) -> tuple[Seq2SeqEngine | None, str]:
        """The paged engine if the model can be paged and passes the self-check, else None; and why.

        Logs one line when the model goes to the fallback."""
        name = self.loaded.spec.name
        try:
            engine = Seq2SeqEngine(self.loaded.model, config, max_encoder_len=self.max_input_tokens)
        except UnsupportedArchitecture as exc:
            log.info("%s runs on batched generate, not the paged engine: %s", name, exc)
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - the fallback serves the model exactly; the worker starts
            log.warning("%s runs on batched generate: building the paged engine raised %r", name, exc)
            return None, f"building the paged engine raised {type(exc).__name__}: {exc}"
        check = self_check(engine)
        if not check.passed:
            engine.close()
            log.warning("%s runs on batched generate: the paged engine failed its self-check: %s", name, check.reason)
            return None, f"self-check failed: {check.reason}"
        return engine, f"self-check passed ({check.seconds * 1000:.0f} ms, max logit error {check.max_logit_error:.2g})"

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
            self._new.push(request)

    def abort(self, request_id: str, error: BaseException) -> bool:
        held = self._new.remove(request_id)
        paged = self._paged.pop(request_id, None)
        if paged is not None and self.engine is not None:
            self.engine.abort_request(request_id)  # blocks freed on return
            held.append(paged[0])
        held += [req for req in self.fallback.waiting.requests() if req.id == request_id]
        self.fallback.remove(request_id)
        for request in held:
            request.fail(error)
        return bool(held)

    def has_work(self) -> bool:
        busy = self.engine is not None and self.engine.has_unfinished_requests()
        return bool(self._new) or busy or len(self.fallback) > 0

    def step(self) -> None:
        self._admit_new()
        self._drop_cancelled()
        if self.engine is not None and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                self._complete(out)
        if len(self.fallback) > 0:
            for request, encoded, row in self.fallback.step():
                tokens, reason = split_output(row, self.loaded.model, encoded.key.max_new_tokens)
                self._finish(request, encoded, tokens, reason)

    def work_done(self) -> int:
        """The paged engine's batched tokens; the `generate` fallback's are not counted."""
        return self.engine.counters.batched_tokens if self.engine is not None else 0

    def saturated(self) -> bool:
        engine = self.engine
        return bool(self._new) or len(self.fallback) > 0 or (engine is not None and engine.scheduler.saturated)

    def stats(self) -> ModelStats:
        """The paged engine's gauges and both paths' counters, `path` ("paged" | "generate") and `path_reason`;
        extra: requests that went to the `generate` fallback."""
        engine = self.engine.stats() if self.engine is not None else None
        return ModelStats(
            num_requests_running=engine.num_requests_running if engine else 0,
            num_requests_waiting=len(self._new) + len(self.fallback) + (engine.num_requests_waiting if engine else 0),
            num_requests_finished=self._counters["num_requests_finished"],
            steps=(engine.num_steps if engine else 0) + self.fallback.steps,
            generated_tokens=self._counters["generated_tokens"],
            kv_cache_usage_perc=engine.kv_cache_usage_perc if engine else 0.0,
            num_preemptions=engine.num_preemptions if engine else 0,
            path="paged" if self.engine is not None else "generate", path_reason=self.path_reason,
            kv_cache_dtype=self.engine.pool.dtype_name if self.engine else "",
            extra={"num_fallback_requests": self._counters["num_fallback_requests"]},
        )

    def _drop_cancelled(self) -> None:
        """Requests whose future was completed elsewhere (e.g. cancelled by the caller) stop at once."""
        for request_id, (request, _) in list(self._paged.items()):
            if request.future.done():
                del self._paged[request_id]
                if self.engine is not None:
                    self.engine.abort_request(request_id)

    # ---- admission --------------------------------------------------------------------------------
    def _admit_new(self) -> None:
        """Tokenize the most urgent `lookahead(max_running_requests)` new requests (one call per source language:
        multilingual tokenizers keep it as state), then route them, most urgent first, to the engine or the
        fallback; the rest wait for the next steps, so a bulk never holds the engine thread in one long call."""
        new = [request for request, _ in self._new.take(lookahead(self.config.max_running_requests))]
        resolved: list[tuple[EngineRequest, Languages]] = []
        for request in new:
            try:
                resolved.append((request, self._languages(request)))
            except PagedqError as exc:
                request.fail(exc)
        encoded: dict[str, tuple[dict[str, list[int]], int]] = {}
        by_source = sorted(resolved, key=lambda item: item[1].src_lang or "")
        for src_lang, group in groupby(by_source, key=lambda item: item[1].src_lang):
            items = list(group)
            if src_lang is not None:
                self.loaded.tokenizer.src_lang = src_lang
            for (request, _), tokens in zip(items, self._tokenize([lang.text for _, lang in items]), strict=True):
                encoded[request.id] = tokens
        for request, languages in resolved:
            self._route(request, languages, encoded[request.id])

    def _languages(self, request: EngineRequest) -> Languages:
        model = self.loaded.model
        return resolve_languages(self.loaded.spec, self.loaded.tokenizer, model.config, _payload(request))

    def _tokenize(self, texts: list[str]) -> list[tuple[dict[str, list[int]], int]]:
        """(inputs, untruncated length) per text; an over-long text is cut to the limit (`_route` decides)."""
        tokenizer, limit = self.loaded.tokenizer, self.max_input_tokens
        full = tokenizer(texts, truncation=False, verbose=False)
        out = []
        for i, text in enumerate(texts):
            inputs = {name: full[name][i] for name in self._input_names if name in full}
            length = len(inputs["input_ids"])
            if length > limit:
                cut = tokenizer(text, truncation=True, max_length=limit)
                inputs = {name: cut[name] for name in inputs}
            out.append((inputs, length))
        return out

    def _route(self, request: EngineRequest, languages: Languages, tokenized: tuple[dict[str, list[int]], int]) -> None:
        inputs, length = tokenized
        payload, model = _payload(request), self.loaded.model
        truncated = length > self.max_input_tokens
        if truncated and not payload.truncate:
            request.fail(too_long(length, self.max_input_tokens, "text"))
            return
        unknown = unknown_request_options(payload.generation)
        if unknown:
            request.fail(InvalidRequest(f"model {self.loaded.spec.name!r} does not implement the options {unknown}"))
            return
        forced_bos = languages.forced_bos_token_id
        key = generation_key(payload.generation, request.id, model, forced_bos)
        encoded = EncodedText(inputs, truncated, key)
        if self.engine is None or unsupported_options(model, payload.generation):
            self._counters["num_fallback_requests"] += 1
            self.fallback.push(request, encoded, order_key(request))
            return
        settings = decode_settings(model, payload.generation, forced_bos)
        try:
            self.engine.add_request(request.id, inputs["input_ids"], settings, request.priority)
        except ValueError as exc:
            request.fail(InvalidRequest(str(exc)))
            return
        self._paged[request.id] = (request, encoded)

    # ---- results ----------------------------------------------------------------------------------
    def _complete(self, out: RequestOutput) -> None:
        entry = self._paged.pop(out.request_id, None)
        if entry is None:
            return  # aborted by us: already failed
        request, encoded = entry
        if out.finish_reason in ("stop", "length"):
            request.first_token_at = out.first_token_at
            self._finish(request, encoded, out.output_token_ids, out.finish_reason)  # type: ignore[arg-type]

    def _finish(
        self, request: EngineRequest, encoded: EncodedText, tokens: list[int], reason: Literal["stop", "length"]
    ) -> None:
        self._counters["generated_tokens"] += len(tokens)
        self._counters["num_requests_finished"] += 1
        request.finish(
            TranslateResult(
                model=self.loaded.spec.name,
                translation=self.loaded.tokenizer.decode(tokens, skip_special_tokens=True),
                output_tokens=len(tokens),
                finish_reason=reason,
                input_tokens=encoded.num_tokens,
                truncated=encoded.truncated,
            )
        )
