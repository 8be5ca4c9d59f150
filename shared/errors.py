"""Errors with stable names shared by the worker and the producer.

The worker raises these inside Celery tasks; Celery stores the class name and message in the result
backend (JSON), and the producer maps them back to task states and `TaskError{type, message}`.
"""

from __future__ import annotations


class PagedqError(Exception):
    """Base of every error pagedq reports to a user."""

    #: HTTP status the API uses when this error is raised before a task is enqueued.
    http_status = 400


class InvalidRequest(PagedqError):
    """The request is well-formed JSON but cannot be served (e.g. input too long)."""

    http_status = 422


class ModelNotFound(PagedqError):
    """The request names a model that is not in the registry."""

    http_status = 404


class UnsupportedLanguagePair(PagedqError):
    """No registered translation model serves this source/target language pair."""

    http_status = 422


class TaskNotFound(PagedqError):
    """No task with this id was ever submitted (or its record has expired)."""

    http_status = 404


class DeadlineExceeded(PagedqError):
    """The task's deadline passed before it finished. Ends in the `expired` state."""

    http_status = 504


class TaskCancelled(PagedqError):
    """The task was cancelled by a user. Ends in the `cancelled` state."""

    http_status = 409


class EngineError(PagedqError):
    """The inference engine failed on this request (the worker stays up)."""

    http_status = 500


class ModelError(EngineError):
    """The model or tokenizer failed on this request alone.

    The engine found it by re-running the failed step's batch in smaller groups without it; the other
    requests of that batch were not affected."""

    http_status = 422


class WorkerShuttingDown(PagedqError):
    """Internal, never stored as a task outcome: the worker stopped before this request finished.

    The task is handed back to its queue (Celery `Reject(requeue=True)`) and another worker runs it."""

    http_status = 503
