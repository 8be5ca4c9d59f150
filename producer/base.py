"""The task methods both clients offer; `Client` runs them on Redis, `HTTPClient` over the HTTP API."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, Self

from pydantic import BaseModel

from pagedq.producer.handle import TaskHandle
from pagedq.producer.parsing import RequestInput, task_type_of
from pagedq.producer.service import ProgressCallback
from pagedq.shared.models import (
    ClassifyResult,
    QAResult,
    SubmitResponse,
    TaskStatus,
    TaskType,
    TranslateResult,
)


class BaseClient(ABC):
    """Submission, waiting and handles on top of the primitives each subclass implements (the abstract ones).

    Every submission validates with the shared request models first: bad input raises
    `pydantic.ValidationError` before anything is sent.
    """

    @abstractmethod
    def _submit(self, task_type: TaskType, request: RequestInput) -> SubmitResponse: ...

    @abstractmethod
    def _submit_bulk(
        self, task_type: TaskType, requests: Sequence[RequestInput], on_progress: ProgressCallback | None
    ) -> list[SubmitResponse]: ...

    @abstractmethod
    def status(self, task_id: str) -> TaskStatus:
        """The task's status; TaskNotFound (HTTP: APIError 404) for an unknown id."""

    @abstractmethod
    def cancel(self, task_id: str) -> TaskStatus:
        """Cancel a queued or running task; an error if it is already final."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        return [self.status(t) for t in task_ids]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one task -----------------------------------------------------------------------------------------

    def classify(self, text: str, **options: Any) -> TaskHandle[ClassifyResult]:
        """Options: model, priority, timeout_s, truncate, top_k, function_to_apply."""
        return self._handle(self._submit(TaskType.CLASSIFY, {"text": text, **options}))

    def translate(
        self, text: str, source_lang: str | None = None, target_lang: str | None = None, **options: Any
    ) -> TaskHandle[TranslateResult]:
        """Options: model, priority, timeout_s, truncate, generation (dict of GenerationOptions)."""
        data = {"text": text, "source_lang": source_lang, "target_lang": target_lang, **options}
        return self._handle(self._submit(TaskType.TRANSLATE, data))

    def qa(self, question: str, context: str, **options: Any) -> TaskHandle[QAResult]:
        """Options: model, priority, timeout_s, truncate, mode, max_answer_len, handle_impossible_answer,
        generation."""
        return self._handle(self._submit(TaskType.QA, {"question": question, "context": context, **options}))

    def submit(self, request: RequestInput, task_type: TaskType | str | None = None) -> TaskHandle[Any]:
        """Submit a request model instance (ClassifyRequest, TranslateRequest, QARequest), or a dict of
        request fields together with its `task_type`."""
        if task_type is None:
            if not isinstance(request, BaseModel):
                raise TypeError("submitting a dict needs its task_type ('classify', 'translate' or 'qa')")
            task_type = task_type_of(request)
        return self._handle(self._submit(TaskType(task_type), request))

    # -- many tasks ---------------------------------------------------------------------------------------

    def bulk(
        self, task_type: TaskType | str, requests: Sequence[RequestInput], on_progress: ProgressCallback | None = None
    ) -> list[TaskHandle[Any]]:
        """Submit many requests of one type, all or nothing: one bad item and none is enqueued."""
        responses = self._submit_bulk(TaskType(task_type), requests, on_progress)
        return [self._handle(r) for r in responses]

    def bulk_classify(
        self, texts: Iterable[str], on_progress: ProgressCallback | None = None, **options: Any
    ) -> list[TaskHandle[ClassifyResult]]:
        return self.bulk(TaskType.CLASSIFY, [{"text": t, **options} for t in texts], on_progress)

    def bulk_translate(
        self,
        texts: Iterable[str],
        source_lang: str | None = None,
        target_lang: str | None = None,
        on_progress: ProgressCallback | None = None,
        **options: Any,
    ) -> list[TaskHandle[TranslateResult]]:
        items = [{"text": t, "source_lang": source_lang, "target_lang": target_lang, **options} for t in texts]
        return self.bulk(TaskType.TRANSLATE, items, on_progress)

    def bulk_qa(
        self, pairs: Iterable[tuple[str, str]], on_progress: ProgressCallback | None = None, **options: Any
    ) -> list[TaskHandle[QAResult]]:
        """`pairs` are (question, context)."""
        items = [{"question": q, "context": c, **options} for q, c in pairs]
        return self.bulk(TaskType.QA, items, on_progress)

    # -- waiting ------------------------------------------------------------------------------------------

    @abstractmethod
    def wait(self, task_id: str, timeout: float | None = None) -> TaskStatus:
        """The final status as soon as the task is final (pushed, or long-polled over HTTP); TimeoutError after
        `timeout` seconds (None: no limit)."""

    @abstractmethod
    def wait_all(
        self, task_ids: Sequence[str], timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> list[TaskStatus]:
        """Every task's final status, in `task_ids` order. `on_progress(finished, total)`."""

    def handle(self, task_id: str, task_type: TaskType) -> TaskHandle[Any]:
        """A handle for a task submitted earlier (e.g. by another process)."""
        return TaskHandle(task_id, task_type, self)

    def _handle(self, response: SubmitResponse) -> TaskHandle[Any]:
        return TaskHandle(response.id, response.type, self)
