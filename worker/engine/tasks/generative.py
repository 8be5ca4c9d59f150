"""GenerativeExecutor: generative QA and translation on a causal LM, through the paged `LLMEngine`.

Prompts come from `spec.prompt_template` (or the defaults below). The QA template puts the context
FIRST, so questions about one context share its KV blocks through the prefix cache. Over-long prompts
are cut (QA: the context loses its beginning; translation: the text loses its end) and reported as
`truncated`, or rejected with `InvalidRequest` when the request says `truncate=false`.

Invariants: only the engine thread calls this; each request's future completes exactly once
(result, the error given to `abort`, `DeadlineExceeded` when the engine expires it, or
`InvalidRequest` at `add`); `abort` frees the request's KV blocks before it returns.

Options: a request's `GenerationOptions` over the model's generation_config, exactly as `generate` applies them
or refused (`causal_options`: an unsupported request option fails the request, an unsupported
generation_config field refuses the model when the engine is built).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from pagedq.shared.errors import InvalidRequest
from pagedq.shared.models import GenerationOptions, QARequest, QAResult, TranslateRequest, TranslateResult
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor, ModelStats
from pagedq.worker.engine.core.request import RequestOutput
from pagedq.worker.engine.decoder_only.engine import LLMEngine
from pagedq.worker.engine.decoding.causal_options import sampling_params
from pagedq.worker.engine.decoding.sampling import SamplingParams
from pagedq.worker.engine.tasks.batching import input_token_limit, too_long

QA_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
TRANSLATE_TEMPLATE = "Translate from {source_lang} to {target_lang}:\n{text}\n"
QA_STOP = ("\nQuestion:", "\nContext:")  # the model started another example: the answer is over


@dataclass
class _Prompt:
    token_ids: list[int]
    truncated: bool


class GenerativeExecutor(ModelExecutor):
    """Serves `QARequest` (mode generative) and `TranslateRequest` with one `LLMEngine`."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, **engine_options: Any) -> None:
        super().__init__(loaded, config)
        engine_config = dataclasses.replace(
            config, enable_prefix_caching=config.enable_prefix_caching and loaded.spec.prefix_caching
        )
        self.engine = LLMEngine(loaded.model, loaded.tokenizer, engine_config, loaded.spec.name, **engine_options)
        limit = input_token_limit(loaded)
        self.max_input_tokens = min(limit, self.engine.max_model_len - 1) if self.engine.max_model_len else limit
        self._requests: dict[str, tuple[EngineRequest, _Prompt]] = {}
        self._finished = 0  # requests completed (a result or an error), for `stats()`

    # ---- ModelExecutor ----------------------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        stop: tuple[str, ...]
        try:
            payload = request.payload
            if isinstance(payload, QARequest) and payload.mode in (None, "generative"):
                prompt, stop = self._qa_prompt(payload), QA_STOP
            elif isinstance(payload, TranslateRequest):
                prompt, stop = self._translate_prompt(payload), () if "\n" in payload.text else ("\n",)
            else:
                raise InvalidRequest(f"{self.loaded.spec.name} does generative QA and translation, not {request.task}")
            params = self._sampling_params(payload.generation, stop)
            on_token = request.stream.open(self.loaded.tokenizer, stop) if request.stream is not None else None
            self.engine.add_request(request.id, prompt.token_ids, params, request.priority, on_token)
        except (InvalidRequest, ValueError) as exc:
            request.fail(exc if isinstance(exc, InvalidRequest) else InvalidRequest(str(exc)))
            return
        self._requests[request.id] = (request, prompt)

    def abort(self, request_id: str, error: BaseException) -> bool:
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        self.engine.abort_request(request_id)
        entry[0].fail(error)
        return True

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> None:
        outputs = self.engine.step()
        stepped_at = time.monotonic()  # when this step's tokens exist
        for out in outputs:
            entry = self._requests.get(out.request_id)
            if entry is None:
                continue  # aborted by us (already failed)
            if entry[0].first_token_at is None and out.output_token_ids:
                entry[0].first_token_at = stepped_at  # TTFT (worker/metrics.py)
            if not out.finished:
                continue  # still generating
            request, prompt = self._requests.pop(out.request_id)
            self._finished += 1
            request.finish(self._result(request, prompt, out))

    def work_done(self) -> int:
        return self.engine.counters.batched_tokens

    def saturated(self) -> bool:
        return self.engine.scheduler.saturated

    def stats(self) -> ModelStats:
        """The paged engine's gauges and counters; `path` is always "paged" (a causal LM the engine cannot run
        exactly is refused at load: there is no fallback); extra: mean batch tokens, KV waste, blocks."""
        s = self.engine.stats()
        return ModelStats(
            num_requests_running=s.num_requests_running, num_requests_waiting=s.num_requests_waiting,
            num_requests_finished=self._finished, steps=s.num_steps, generated_tokens=s.num_generated_tokens,
            kv_cache_usage_perc=s.kv_cache_usage_perc, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_preemptions=s.num_preemptions, path="paged",
            kv_cache_dtype=self.engine.cache.dtype_name,
            extra={"mean_batch_tokens": s.mean_batch_tokens, "kv_waste_slots": s.kv_waste_slots,
                   "num_kv_blocks": s.num_kv_blocks},
        )  # fmt: skip

    # ---- prompts ----------------------------------------------------------------------------------

    def _qa_prompt(self, payload: QARequest) -> _Prompt:
        template = self.loaded.spec.prompt_template or QA_TEMPLATE
        return self._encode(template, "context", payload.truncate, keep_end=True,
                            context=payload.context, question=payload.question)  # fmt: skip

    def _translate_prompt(self, payload: TranslateRequest) -> _Prompt:
        template = self.loaded.spec.prompt_template or TRANSLATE_TEMPLATE
        pair = self.loaded.spec.languages[0].split("-") if self.loaded.spec.languages else ["", ""]
        source = payload.source_lang or pair[0] or "the source language"
        target = payload.target_lang or pair[1] or "the target language"
        return self._encode(template, "text", payload.truncate, keep_end=False,
                            text=payload.text, source_lang=source, target_lang=target)  # fmt: skip

    def _encode(self, template: str, cut_field: str, truncate: bool, keep_end: bool, **fields: str) -> _Prompt:
        """Tokenize the filled template; if too long, cut `cut_field` (its start if `keep_end`)."""
        tokenizer, limit = self.loaded.tokenizer, self.max_input_tokens
        ids = tokenizer.encode(_fill(template, fields))
        if len(ids) <= limit:
            return _Prompt(ids, False)
        if not truncate:
            raise too_long(len(ids), limit, "prompt")
        marker = "{" + cut_field + "}"
        head, _, tail = template.partition(marker) if marker in template else (template, "", "")
        head_ids = tokenizer.encode(_fill(head, fields))
        tail_ids = tokenizer.encode(_fill(tail, fields), add_special_tokens=False)
        field_ids = tokenizer.encode(fields[cut_field], add_special_tokens=False)
        room = limit - len(head_ids) - len(tail_ids)
        if room <= 0:
            raise InvalidRequest(f"the prompt without its {cut_field} is already over the limit of {limit} tokens")
        kept = field_ids[-room:] if keep_end else field_ids[:room]
        return _Prompt(head_ids + kept + tail_ids, True)

    # ---- options and results ----------------------------------------------------------------------

    def _sampling_params(self, options: GenerationOptions, stop: tuple[str, ...]) -> SamplingParams:
        """GenerationOptions over the model's generation_config (`causal_options.sampling_params`)."""
        stop = stop if self.loaded.tokenizer is not None else ()
        return sampling_params(self.loaded.model, options, sorted(self.engine.stop_checker.eos_token_ids), stop)

    def _result(self, request: EngineRequest, prompt: _Prompt, out: RequestOutput) -> QAResult | TranslateResult:
        text = (out.text or "").strip()
        common = dict(
            model=self.loaded.spec.name,
            input_tokens=len(prompt.token_ids),
            truncated=prompt.truncated,
            output_tokens=len(out.output_token_ids),
        )
        if isinstance(request.payload, TranslateRequest):
            reason = "length" if out.finish_reason == "length" else "stop"
            return TranslateResult(translation=text, finish_reason=reason, **common)
        return QAResult(mode="generative", answer=text, **common)


def _fill(template: str, fields: dict[str, str]) -> str:
    """`template.format(**fields)` that leaves unknown `{names}` as they are."""
    return template.format_map(_Missing(fields))


class _Missing(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"
