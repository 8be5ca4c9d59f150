"""Request, result and task-status models: the contracts between apps, the API and the worker.

Every request forbids unknown fields, so a typo is a validation error rather than a silently ignored
option. Size limits come from `shared.settings.Limits` (env `PAGEDQ_LIMITS__*`) and are checked here, so
the Python client, the HTTP API and the worker enforce the same ones.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from shared.settings import Limits, get_settings


class TaskType(StrEnum):
    CLASSIFY = "classify"
    TRANSLATE = "translate"
    QA = "qa"


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self not in (TaskState.QUEUED, TaskState.RUNNING)


def _limits(info: ValidationInfo) -> Limits:
    """Limits from the validation context if given (tests, the API), else from the settings."""
    ctx = info.context or {}
    return ctx.get("limits") or get_settings().limits


def _check_text(value: str, limit: int, field: str) -> str:
    if not value.strip():
        raise ValueError(f"{field} must not be empty or whitespace")
    if len(value) > limit:
        raise ValueError(f"{field} is {len(value)} characters; the limit is {limit}")
    return value


class _Request(BaseModel):
    """Fields every task request has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, min_length=1, max_length=200, description="Registry name; default per task type.")
    priority: int = Field(0, ge=-100, le=100, description="Lower runs first; ties by arrival.")
    timeout_s: float | None = Field(None, gt=0, description="Deadline from submission; the task expires after it.")
    truncate: bool = Field(True, description="Truncate over-long input to the model's maximum (reported), or reject.")

    @field_validator("timeout_s")
    @classmethod
    def _timeout_limit(cls, v: float | None, info: ValidationInfo) -> float | None:
        limit = _limits(info).max_timeout_s
        if v is not None and v > limit:
            raise ValueError(f"timeout_s is {v}; the limit is {limit}")
        return v


class ClassifyRequest(_Request):
    """Text classification: text -> label, score and the scores of all (or the top_k) labels."""

    text: str
    top_k: int | None = Field(1, ge=1, description="How many labels to return, best first; null for all.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="Score function; default from the model (sigmoid for multi-label models)."
    )

    @field_validator("text")
    @classmethod
    def _text(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, _limits(info).max_text_chars, "text")


class GenerationOptions(BaseModel):
    """Decoding options shared by translation and generative QA; `None` means the model's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    num_beams: int | None = Field(None, ge=1)

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_new_tokens
        if v is not None and v > limit:
            raise ValueError(f"max_new_tokens is {v}; the limit is {limit}")
        return v

    @field_validator("num_beams")
    @classmethod
    def _beams(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_beams
        if v is not None and v > limit:
            raise ValueError(f"num_beams is {v}; the limit is {limit}")
        return v

    @model_validator(mode="after")
    def _beams_or_sampling(self) -> GenerationOptions:
        if self.do_sample and (self.num_beams or 1) > 1:
            raise ValueError("choose either sampling (do_sample) or beam search (num_beams > 1), not both")
        return self


class TranslateRequest(_Request):
    """Translation. `source_lang`/`target_lang` pick the model (or its target-language token)."""

    text: str
    source_lang: str | None = Field(None, min_length=2, max_length=16, pattern=r"^[A-Za-z_\-]+$")
    target_lang: str | None = Field(None, min_length=2, max_length=16, pattern=r"^[A-Za-z_\-]+$")
    generation: GenerationOptions = Field(default_factory=GenerationOptions)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, _limits(info).max_text_chars, "text")


class QARequest(_Request):
    """Question answering over a context: extractive (a span) or generative (free text)."""

    question: str
    context: str
    mode: Literal["extractive", "generative"] | None = Field(None, description="Default: what the model does.")
    max_answer_len: int = Field(30, ge=1, le=512, description="Extractive: longest answer span, in tokens.")
    handle_impossible_answer: bool = Field(False, description="Extractive: allow the empty 'no answer'.")
    generation: GenerationOptions = Field(default_factory=GenerationOptions)

    @field_validator("question")
    @classmethod
    def _question(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, _limits(info).max_text_chars, "question")

    @field_validator("context")
    @classmethod
    def _context(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, _limits(info).max_context_chars, "context")


TaskRequest = ClassifyRequest | TranslateRequest | QARequest
REQUEST_MODELS: dict[TaskType, type[_Request]] = {
    TaskType.CLASSIFY: ClassifyRequest,
    TaskType.TRANSLATE: TranslateRequest,
    TaskType.QA: QARequest,
}


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Registry name of the model that served the request.")
    input_tokens: int = Field(0, ge=0, description="Tokens the model read (after truncation).")
    truncated: bool = Field(False, description="True when the input was cut to the model's maximum length.")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(_Result):
    type: Literal["classify"] = "classify"
    label: str
    score: float
    scores: list[LabelScore] = Field(description="Labels with scores, best first (top_k of them).")


class TranslateResult(_Result):
    type: Literal["translate"] = "translate"
    translation: str
    output_tokens: int = Field(0, ge=0)
    finish_reason: Literal["stop", "length"] = "stop"


class QAResult(_Result):
    type: Literal["qa"] = "qa"
    mode: Literal["extractive", "generative"]
    answer: str
    score: float | None = Field(None, description="Extractive: span probability.")
    start: int | None = Field(None, description="Extractive: character offset of the answer in the context.")
    end: int | None = Field(None, description="Extractive: end character offset (exclusive).")
    output_tokens: int = Field(0, ge=0)


TaskResult = Annotated[ClassifyResult | TranslateResult | QAResult, Field(discriminator="type")]


class TaskError(BaseModel):
    type: str = Field(description="Error class, e.g. DeadlineExceeded, InvalidRequest, EngineError.")
    message: str


class TaskStatus(BaseModel):
    """What `GET /v1/tasks/{id}` and `Client.status(id)` return."""

    id: str
    type: TaskType
    state: TaskState
    model: str | None = None
    priority: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = None
    result: TaskResult | None = None
    error: TaskError | None = None


class SubmitResponse(BaseModel):
    """What a submission returns: the id to poll and where."""

    id: str
    type: TaskType
    state: TaskState = TaskState.QUEUED
    location: str


class BulkSubmitResponse(BaseModel):
    tasks: list[SubmitResponse]
