"""Text classification: micro-batched encoder forwards over every waiting request of one model.

Each `step()`:
1. drops requests that expired (DeadlineExceeded) or were completed elsewhere;
2. queues the requests tokenized before they arrived (`prepare`, in the submitting thread), and tokenizes
   at most `lookahead(max_running_requests)` of the others, most urgent first, in one call -- so a bulk of
   thousands never holds the engine thread (and every other model on it) in one long tokenizer call;
   inputs longer than the model's limit are truncated (and reported) or rejected (InvalidRequest);
3. picks one batch under `EngineConfig.max_batch_tokens` / `max_running_requests`, head of the priority
   queue first: packed (real tokens only, first fit in queue order) on models that pack, else padded and
   bucketed by length (`forward.EncoderForward`, `batching`);
4. runs ONE forward and completes each request with a `ClassifyResult`.

Scores follow transformers' `pipeline("text-classification")`: sigmoid for multi-label models or a single
label, softmax for several labels, nothing for regression; the request's `function_to_apply` overrides.
A request holds nothing between steps except its place in the queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pagedq.shared.errors import InvalidRequest
from pagedq.shared.models import ClassifyRequest, ClassifyResult
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor, ModelStats
from pagedq.worker.engine.cpu.linear import prepare_for_host
from pagedq.worker.engine.encoder.batch_encoder import BatchEncoder
from pagedq.worker.engine.encoder.forward import EncoderForward
from pagedq.worker.engine.tasks.batching import (
    Arrivals,
    WaitingQueue,
    drop_finished,
    input_token_limit,
    lookahead,
    order_key,
    too_long,
)

SOFTMAX, SIGMOID, NO_FUNCTION = "softmax", "sigmoid", "none"
#: `prepare` tokenizes groups of at least this many texts (a batch message); a single text is cheaper to
#: tokenize with the others of its step, in one call on the engine thread: one call per text cost a busy
#: worker ~0.25 ms of CPU per task, against ~0.14 ms in a step's batch
PREPARE_MIN = 2


@dataclass
class _Encoded:
    """A tokenized request: the model inputs of one unpadded row."""

    inputs: dict[str, list[int]]
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return len(self.inputs["input_ids"])


def _payload(request: EngineRequest) -> ClassifyRequest:
    assert isinstance(request.payload, ClassifyRequest)  # checked by `add`
    return request.payload


def default_function(config: object) -> str:
    """The score function `pipeline("text-classification")` applies when none is requested."""
    problem_type = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", 0)
    if problem_type == "regression":
        return NO_FUNCTION
    if problem_type == "multi_label_classification" or num_labels == 1:
        return SIGMOID
    if problem_type == "single_label_classification" or num_labels > 1:
        return SOFTMAX
    return getattr(config, "function_to_apply", NO_FUNCTION)


def apply_function(logits: torch.Tensor, function: str) -> torch.Tensor:
    """Scores from float32 logits (a row, or rows [n, num_labels]): the function applies along the last axis."""
    if function == SIGMOID:
        return torch.sigmoid(logits)
    if function == SOFTMAX:
        return torch.softmax(logits, dim=-1)
    return logits


def _scores(logits: torch.Tensor, functions: list[str]) -> list[list[float]]:
    """Each row's scores under its function: one tensor op per distinct function in the step, one `tolist` in
    all (a softmax and a `tolist` per row cost a bulk's engine thread ~20 us a text)."""
    if len(set(functions)) == 1:
        return apply_function(logits, functions[0]).tolist()  # type: ignore[no-any-return]
    rows: list[list[float]] = [[] for _ in functions]
    for function in set(functions):
        index = [i for i, f in enumerate(functions) if f == function]
        for i, row in zip(index, apply_function(logits[index], function).tolist(), strict=True):
            rows[i] = row
    return rows


class ClassificationExecutor(ModelExecutor):
    """Runs `ClassifyRequest`s on a `*ForSequenceClassification` model (see the module docstring).

    `packing`: None packs the requests of a step when the model allows it (encoder/packing.py), False keeps
    padded batches, True requires packing. A packing executor owns its model: it swaps its attention."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, packing: bool | None = None) -> None:
        super().__init__(loaded, config)
        self.max_input_tokens = input_token_limit(loaded)
        prepare_for_host(loaded.model, config.cpu_prepack_linear)
        self.forward = EncoderForward(loaded, pooled=True, packing=packing)
        self._input_names = [n for n in loaded.tokenizer.model_input_names if n != "offset_mapping"]
        self._encoder = BatchEncoder.for_tokenizer(loaded.tokenizer, self._input_names)  # None: transformers'
        self._new = Arrivals()  # added, not yet tokenized
        self._waiting: WaitingQueue[_Encoded] = WaitingQueue()
        self._counters = {"steps": 0, "num_requests_finished": 0}
        self._last_batch = 0  # requests in the latest step
        self._id2label = dict(loaded.model.config.id2label)  # once: a transformers config read is slow

    # ---- the ModelExecutor interface ------------------------------------------------------------
    def prepare(self, requests: Sequence[EngineRequest]) -> None:
        """Any thread: tokenize the requests' texts (one call) into `request.prepared`, where the private
        `BatchEncoder` applies and the text fits the model (the rest are tokenized by `step`)."""
        encoder, limit = self._encoder, self.max_input_tokens
        todo = [r for r in requests if isinstance(r.payload, ClassifyRequest) and r.prepared is None]
        if encoder is None or len(todo) < PREPARE_MIN:
            return
        for request, inputs in zip(todo, encoder.encode([_payload(r).text for r in todo]), strict=True):
            if len(inputs["input_ids"]) <= limit:
                request.prepared = _Encoded(inputs, truncated=False)

    def add(self, request: EngineRequest) -> None:
        if not isinstance(request.payload, ClassifyRequest):
            request.fail(InvalidRequest(f"{self.loaded.spec.name} classifies text; got {request.task.value}"))
            return
        if isinstance(request.prepared, _Encoded):
            self._waiting.push(request, request.prepared, order_key(request))
        else:
            self._new.push(request)

    def abort(self, request_id: str, error: BaseException) -> bool:
        held = self._new.remove(request_id)
        held += [req for req in self._waiting.requests() if req.id == request_id]
        self._waiting.remove_request(request_id)
        for request in held:
            request.fail(error)
        return bool(held)

    def has_work(self) -> bool:
        return bool(self._new) or len(self._waiting) > 0

    def step(self) -> None:
        self._tokenize_new()
        window = lookahead(self.config.max_running_requests)
        drop_finished(self._waiting, head=window)
        batch = self.forward.pick(self._waiting.head(window), lambda enc: enc.num_tokens, self.config)
        self._last_batch = len(batch)
        if not batch:
            return
        self._waiting.remove_items([enc for _, enc in batch])
        self._counters["steps"] += 1
        logits = self.forward.logits([enc.inputs for _, enc in batch])
        default = default_function(self.loaded.model.config)  # a transformers config attribute read is slow
        functions = [_payload(request).function_to_apply or default for request, _ in batch]
        scores = _scores(logits, functions)
        for row, (request, encoded) in enumerate(batch):
            request.finish(self._result(_payload(request), scores[row], encoded))
            self._counters["num_requests_finished"] += 1

    def work_done(self) -> int:
        return self.forward.counters["computed_tokens"]

    def planned_tokens(self) -> int | None:
        """What the next step's batch would hold if it took the head of the waiting queue up to the request cap
        and the token budget (`forward.pick` may take less); None while texts wait to be tokenized in it."""
        if self._new or not self._waiting:
            return None
        total, budget = 0, self.config.max_batch_tokens
        for _, encoded in self._waiting.head(self.config.max_running_requests):
            total += encoded.num_tokens
            if total >= budget:
                return budget
        return total

    def saturated(self) -> bool:
        return self._last_batch >= self.config.max_running_requests or bool(self._new) or len(self._waiting) > 0

    def stats(self) -> ModelStats:
        """Counters, `path` ("packed" | "padded") and `path_reason` (why not packed); extra: computed and
        padded tokens."""
        return ModelStats(
            num_requests_waiting=len(self._new) + len(self._waiting),
            num_requests_finished=self._counters["num_requests_finished"], steps=self._counters["steps"],
            path=self.forward.path, path_reason=self.forward.path_reason, extra=dict(self.forward.counters),
        )

    # ---- steps ------------------------------------------------------------------------------------
    def _tokenize_new(self) -> None:
        """Tokenize the most urgent `lookahead(max_running_requests)` of the requests not yet tokenized, in one
        call; queue each, or fail it if it is too long. The rest wait for the next steps: never more than
        this step could consider (they rank after every request tokenized here)."""
        new = self._new.take(lookahead(self.config.max_running_requests))
        if not new:
            return
        tokenizer, limit = self.loaded.tokenizer, self.max_input_tokens
        texts = [_payload(req).text for req, _ in new]
        if self._encoder is not None:
            rows = self._encoder.encode(texts)
        else:
            full = tokenizer(texts, truncation=False, verbose=False)
            columns = [full[name] for name in self._input_names if name in full]  # BatchEncoding[...] is slow
            names = [name for name in self._input_names if name in full]
            rows = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
        long_rows = [i for i, inputs in enumerate(rows) if len(inputs["input_ids"]) > limit]
        cut_rows: dict[int, dict[str, list[int]]] = {}
        if long_rows:
            cut = tokenizer([texts[i] for i in long_rows], truncation=True, max_length=limit)
            names = [name for name in self._input_names if name in cut]
            cut_rows = {i: {name: cut[name][n] for name in names} for n, i in enumerate(long_rows)}
        for i, (request, key) in enumerate(new):
            if i in cut_rows:
                if not _payload(request).truncate:
                    request.fail(too_long(len(rows[i]["input_ids"]), limit, "text"))
                    continue
                self._waiting.push(request, _Encoded(cut_rows[i], truncated=True), key)
            else:
                self._waiting.push(request, _Encoded(rows[i], truncated=False), key)

    def _result(self, payload: ClassifyRequest, scores: list[float], encoded: _Encoded) -> ClassifyResult:
        """Validated from plain data in one pydantic-core call (6 us), 4x cheaper than `model_construct` of the
        result and each label's score in Python."""
        id2label = self._id2label
        ranked: list[dict[str, Any]] = sorted(
            ({"label": str(id2label[i]), "score": float(s)} for i, s in enumerate(scores)),
            key=lambda ls: float(ls["score"]),
            reverse=True,  # stable, like the pipeline's sort: ties keep label order
        )
        top = ranked if payload.top_k is None else ranked[: payload.top_k]
        return ClassifyResult.model_validate({
            "model": self.loaded.spec.name,
            "label": ranked[0]["label"],
            "score": ranked[0]["score"],
            "scores": top,
            "input_tokens": encoded.num_tokens,
            "truncated": encoded.truncated,
        })
