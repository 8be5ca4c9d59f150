"""Extractive question answering: context windows of all requests, micro-batched under the token budget.

A long context is split the way transformers' question-answering pipeline splits it (one tokenizer call:
question first, `truncation="only_second"`, `max_length=max_seq_len`, `stride=doc_stride`,
`return_overflowing_tokens`, offsets)::

    [CLS] question [SEP] context tokens 0 ........ 380 [SEP]
    [CLS] question [SEP]        context tokens 253 ....... 633 [SEP]     (doc_stride tokens overlap)
    [CLS] question [SEP]                       context tokens 506 .. 700 [SEP]

Every window is a queue item of its request (ordered by the request's priority and arrival, then window
number). Each `step()` runs ONE forward over the windows `forward.EncoderForward` picks -- packed
(real tokens only) on models that pack, else a padded batch bucketed by length -- so a request may span
several steps; when its last window is scored, `qa_spans.combine_windows` picks the answer.

A step tokenizes at most `lookahead(max_running_requests)` new requests, most urgent first: a bulk of thousands
is split into windows a slice per step, never in one call that holds the engine thread (and every other model).

Invariants: a request is either in `_new` (not tokenized yet) or in `_pending` with exactly
`windows_left` items in the queue; abort and expiry remove both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagedq.shared.errors import InvalidRequest
from pagedq.shared.models import QARequest, QAResult
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor, ModelStats
from pagedq.worker.engine.cpu.linear import prepare_for_host
from pagedq.worker.engine.encoder.forward import EncoderForward
from pagedq.worker.engine.tasks.batching import (
    Arrivals,
    WaitingQueue,
    drop_finished,
    input_token_limit,
    lookahead,
)
from pagedq.worker.engine.tasks.qa_spans import WindowSpan, best_span, combine_windows

PIPELINE_MAX_SEQ_LEN = 384  # the pipeline's default window length (capped by the model's limit)
PIPELINE_DOC_STRIDE = 128  # the pipeline's default overlap (at most half a window)
CONTEXT_SEQUENCE = 1  # sequence id of the context when the question comes first


def _payload(request: EngineRequest) -> QARequest:
    assert isinstance(request.payload, QARequest)  # checked by `add`
    return request.payload


@dataclass(eq=False)
class _Window:
    request_id: str
    index: int
    inputs: dict[str, list[int]]
    p_mask: np.ndarray  # 1 where a token cannot be part of the answer
    encoding: Any  # tokenizers.Encoding: word ids and character offsets

    @property
    def num_tokens(self) -> int:
        return len(self.inputs["input_ids"])


@dataclass
class _Pending:
    request: EngineRequest
    windows: list[_Window]
    spans: dict[int, WindowSpan] = field(default_factory=dict)

    @property
    def windows_left(self) -> int:
        return len(self.windows) - len(self.spans)


class ExtractiveQAExecutor(ModelExecutor):
    """Runs extractive `QARequest`s on a `*ForQuestionAnswering` model (see the module docstring).

    `packing`: None packs the windows of a step when the model allows it (encoder/packing.py), False keeps
    padded batches, True requires packing. A packing executor owns its model: it swaps its attention."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, packing: bool | None = None) -> None:
        super().__init__(loaded, config)
        prepare_for_host(loaded.model, config.cpu_prepack_linear)
        self.forward = EncoderForward(loaded, pooled=False, packing=packing)
        tokenizer = loaded.tokenizer
        if not tokenizer.is_fast:
            raise ValueError(f"{loaded.spec.name}: extractive QA needs a fast tokenizer (character offsets)")
        self.max_seq_len = min(input_token_limit(loaded), PIPELINE_MAX_SEQ_LEN)
        self.doc_stride = min(self.max_seq_len // 2, PIPELINE_DOC_STRIDE)
        self.question_first = tokenizer.padding_side == "right"  # as the pipeline decides
        # The tokenizer panics unless the context part of a window is longer than the stride.
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        self.max_question_tokens = self.max_seq_len - specials - self.doc_stride - 1
        self._input_names = list(tokenizer.model_input_names)
        self._new = Arrivals()  # added, not yet tokenized
        self._pending: dict[str, _Pending] = {}
        self._waiting: WaitingQueue[_Window] = WaitingQueue()
        self._counters = {"steps": 0, "num_windows": 0, "num_requests_finished": 0}
        self._last_batch = 0  # windows in the latest step

    # ---- the ModelExecutor interface ------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        payload = request.payload
        if not isinstance(payload, QARequest) or payload.mode == "generative":
            request.fail(InvalidRequest(f"{self.loaded.spec.name} answers extractive questions only"))
            return
        self._new.push(request)

    def abort(self, request_id: str, error: BaseException) -> bool:
        held = self._new.remove(request_id)
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self._waiting.remove_request(request_id)
            held.append(pending.request)
        for request in held:
            request.fail(error)
        return bool(held)

    def has_work(self) -> bool:
        return bool(self._new) or bool(self._pending)

    def step(self) -> None:
        self._tokenize_new()
        head = lookahead(self.config.max_running_requests)
        for request in drop_finished(self._waiting, head=head):
            self._pending.pop(request.id, None)
        batch = self.forward.pick(self._waiting.head(head), lambda window: window.num_tokens, self.config)
        self._last_batch = len(batch)
        if not batch:
            return
        windows = [window for _, window in batch]
        self._waiting.remove_items(windows)
        self._counters["steps"] += 1
        logits = self.forward.token_outputs([w.inputs for w in windows], ("start_logits", "end_logits"))
        for window, (start_logits, end_logits) in zip(windows, logits, strict=True):
            pending = self._pending[window.request_id]
            pending.spans[window.index] = best_span(
                start_logits, end_logits, window.p_mask, _payload(pending.request).max_answer_len
            )
            if pending.windows_left == 0:
                self._finish(self._pending.pop(window.request_id))

    def work_done(self) -> int:
        return self.forward.counters["computed_tokens"]

    def saturated(self) -> bool:
        return self._last_batch >= self.config.max_running_requests or bool(self._new) or bool(self._pending)

    def stats(self) -> ModelStats:
        """Counters, `path` ("packed" | "padded") and `path_reason` (why not packed); extra: windows, computed
        and padded tokens."""
        running = sum(1 for p in self._pending.values() if p.spans)
        return ModelStats(
            num_requests_running=running, num_requests_waiting=len(self._new) + len(self._pending) - running,
            num_requests_finished=self._counters["num_requests_finished"], steps=self._counters["steps"],
            path=self.forward.path, path_reason=self.forward.path_reason,
            extra={"num_windows": self._counters["num_windows"], **self.forward.counters},
        )

    # ---- steps ------------------------------------------------------------------------------------
    def _tokenize_new(self) -> None:
        """Split the most urgent `lookahead(max_running_requests)` new requests into windows (one tokenizer
        call) and queue them; the rest wait for the next steps, so a bulk never holds the engine thread in one
        long tokenizer call."""
        new = self._new.take(lookahead(self.config.max_running_requests))
        if not new:
            return
        tokenizer = self.loaded.tokenizer
        questions = tokenizer([_payload(req).question for req, _ in new], add_special_tokens=False, verbose=False)
        accepted = []
        for (request, key), question_ids in zip(new, questions["input_ids"], strict=True):
            if len(question_ids) > self.max_question_tokens:
                request.fail(
                    InvalidRequest(
                        f"question is {len(question_ids)} tokens; the limit is {self.max_question_tokens} "
                        f"(windows of {self.max_seq_len} tokens overlapping by {self.doc_stride})"
                    )
                )
            else:
                accepted.append((request, key))
        if not accepted:
            return
        first, second = [_payload(r).question for r, _ in accepted], [_payload(r).context for r, _ in accepted]
        encoded = tokenizer(
            text=first if self.question_first else second,
            text_pair=second if self.question_first else first,
            truncation="only_second" if self.question_first else "only_first",
            max_length=self.max_seq_len,
            stride=self.doc_stride,
            return_token_type_ids=True,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        for row, sample in enumerate(encoded["overflow_to_sample_mapping"]):
            request, key = accepted[sample]
            pending = self._pending.setdefault(request.id, _Pending(request, []))
            window = _Window(
                request.id,
                len(pending.windows),
                self._model_inputs(encoded, row),
                self._p_mask(encoded, row),
                encoded.encodings[row],
            )
            pending.windows.append(window)
            self._waiting.push(request, window, key, window.index)
            self._counters["num_windows"] += 1

    def _model_inputs(self, encoded: Any, row: int) -> dict[str, list[int]]:
        return {name: encoded[name][row] for name in self._input_names if name in encoded}

    def _p_mask(self, encoded: Any, row: int) -> np.ndarray:
        """1 for tokens outside the context, 0 for context tokens and [CLS] (the pipeline's mask)."""
        ids = encoded.sequence_ids(row)
        p_mask = np.array([int(s != CONTEXT_SEQUENCE) if self.question_first else 0 for s in ids])
        cls_id = self.loaded.tokenizer.cls_token_id
        if cls_id is not None:
            p_mask[np.asarray(encoded["input_ids"][row]) == cls_id] = 0
        return p_mask

    def _finish(self, pending: _Pending) -> None:
        payload = _payload(pending.request)
        spans = [pending.spans[i] for i in range(len(pending.windows))]
        answer = combine_windows(
            spans,
            [w.encoding for w in pending.windows],
            payload.context,
            CONTEXT_SEQUENCE if self.question_first else 0,
            payload.handle_impossible_answer,
        )
        pending.request.finish(
            QAResult(
                model=self.loaded.spec.name,
                mode="extractive",
                answer=answer.text if answer else "",
                score=answer.score if answer else 0.0,
                start=answer.start if answer else 0,
                end=answer.end if answer else 0,
                input_tokens=sum(w.num_tokens for w in pending.windows),
                truncated=False,  # windows cover the whole context
                output_tokens=0,
            )
        )
        self._counters["num_requests_finished"] += 1
