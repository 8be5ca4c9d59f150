"""Request, result and task-status models: the contracts between apps, the API and the worker.

Every request forbids unknown fields, so a typo is a validation error rather than a silently ignored
option. Size limits come from `pagedq.shared.settings.Limits` (env `PAGEDQ_LIMITS__*`) and are checked here, so
the Python client, the HTTP API and the worker enforce the same ones; `limits_schema` states them in the
JSON schema (the API's OpenAPI document), and each field's static bounds are in its own schema.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pagedq.shared.settings import Limits, get_settings


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


#: Whitespace as Python sees it (`str.isspace`, what `strip()` removes), spelled out so that the schema's
#: pattern means the same in every regex dialect: ECMA's `\s` has \ufeff but not \x1c-\x1f or \x85.
_WHITESPACE = r"\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
#: A text is not blank when this matches in it (JSON Schema patterns are unanchored: "contains one").
NOT_BLANK = f"[^{_WHITESPACE}]"
_NOT_BLANK = re.compile(NOT_BLANK)
#: The schema of every input text; its length limit is a setting, added by `limits_schema`.
TEXT_SCHEMA: dict[str, Any] = {"minLength": 1, "pattern": NOT_BLANK}
Text = Annotated[
    str,
    Field(json_schema_extra=TEXT_SCHEMA, description="Not blank, valid Unicode, at most `max_text_chars` characters."),
]
Context = Annotated[
    str,
    Field(
        json_schema_extra=TEXT_SCHEMA, description="Not blank, valid Unicode, at most `max_context_chars` characters."
    ),
]

#: Smallest sampling temperature: logits / temperature must stay a usable distribution (float32 softmax,
#: no overflow to inf/nan). Greedy and beam search ignore the temperature.
MIN_SAMPLING_TEMPERATURE = 1e-2


def _check_text(value: str, limit: int, field: str) -> str:
    if not _NOT_BLANK.search(value):
        raise ValueError(f"{field} must not be empty or whitespace")
    if len(value) > limit:
        raise ValueError(f"{field} is {len(value)} characters; the limit is {limit}")
    return _check_unicode(value, field)


def _check_unicode(value: str, field: str) -> str:
    """Reject what no tokenizer can take: a lone surrogate (JSON allows `"\\ud800"`, UTF-8 does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{field} is not valid Unicode: a lone surrogate {value[exc.start]!r} at character {exc.start}"
        ) from None
    return value


class _Request(BaseModel):
    """Fields every task request has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, min_length=1, max_length=200, description="Registry name; default per task type.")
    priority: int = Field(0, ge=-100, le=100, description="Lower runs first; ties by arrival.")
    timeout_s: float | None = Field(
        None, gt=0, description="Deadline from submission in seconds, at most `max_timeout_s`; the task expires then."
    )
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

    text: Text
    top_k: int | None = Field(1, ge=1, description="How many labels to return, best first; null for all.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="Score function; default from the model (sigmoid for multi-label models)."
    )

    @field_validator("text")
    @classmethod
    def _text(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, _limits(info).max_text_chars, "text")


#: In JSON Schema, what `GenerationOptions._sampling` checks: with `do_sample`, one beam and a temperature
#: of at least MIN_SAMPLING_TEMPERATURE (`maximum` passes a null `num_beams`).
_SAMPLING_SCHEMA: dict[str, Any] = {
    "if": {"properties": {"do_sample": {"const": True}}, "required": ["do_sample"]},
    "then": {"properties": {"temperature": {"minimum": MIN_SAMPLING_TEMPERATURE}, "num_beams": {"maximum": 1}}},
}


class GenerationOptions(BaseModel):
    """Decoding options shared by translation and generative QA; `None` means the model's default."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_SAMPLING_SCHEMA)

    max_new_tokens: int | None = Field(None, ge=1, description="At most `max_new_tokens` of the server's limits.")
    do_sample: bool = Field(False, description="Sample (temperature, top_p, top_k, seed) instead of greedy/beams.")
    temperature: float = Field(
        1.0,
        gt=0,
        le=10,
        description=f"Sampling only (ignored for greedy and beam search); at least {MIN_SAMPLING_TEMPERATURE} "
        "with do_sample, since a smaller one divides the logits into overflow.",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Sampling only; unset: the model's generation_config, else 1.0.")
    top_k: int = Field(
        0, ge=0, description="Sampling only; 0 disables top-k filtering; unset: the model's generation_config, "
        "else 50 (transformers' generate default)."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    num_beams: int | None = Field(
        None, ge=1, description="Beam search width, at most `max_beams`; more than 1 excludes do_sample."
    )
    stream: bool = Field(
        False, description="Publish the text as it is generated, for `GET /v1/tasks/{id}/stream` (Server-Sent "
        "Events). Token by token on causal LMs; other models send the text in one piece when they finish."
    )

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
    def _sampling(self) -> GenerationOptions:
        if not self.do_sample:
            return self
        if (self.num_beams or 1) > 1:
            raise ValueError("choose either sampling (do_sample) or beam search (num_beams > 1), not both")
        if self.temperature < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(
                f"temperature is {self.temperature}; sampling needs at least {MIN_SAMPLING_TEMPERATURE} "
                "(use do_sample=false for greedy decoding)"
            )
        return self


class TranslateRequest(_Request):
    """Translation. `source_lang`/`target_lang` pick the model (or its target-language token)."""

    text: Text
    source_lang: str | None = Field(None, min_length=2, max_length=16, pattern=r"^[A-Za-z_\-]+$")
    target_lang: str | None = Field(None, min_length=2, max_length=16, pattern=r"^[A-Za-z_\-]+$")
    generation: GenerationOptions = Field(default_factory=GenerationOptions)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, _limits(info).max_text_chars, "text")


class QARequest(_Request):
    """Question answering over a context: extractive (a span) or generative (free text)."""

    question: Text
    context: Context
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


def limits_schema(limits: Limits) -> dict[str, dict[str, dict[str, Any]]]:
    """The JSON Schema keywords that state `limits`, as the validators above enforce them:
    model name -> field -> keywords, to merge into the models' JSON schemas (the API's OpenAPI document).

    `maxLength` counts characters (code points), as `len()` does; keywords of one type pass values of
    another (a null `max_new_tokens` meets `maximum`), so they sit beside a nullable field's `anyOf`.
    """
    timeout = {"timeout_s": {"maximum": limits.max_timeout_s}}
    text = {"maxLength": limits.max_text_chars}
    return {
        ClassifyRequest.__name__: {"text": text, **timeout},
        TranslateRequest.__name__: {"text": text, **timeout},
        QARequest.__name__: {"question": text, "context": {"maxLength": limits.max_context_chars}, **timeout},
        GenerationOptions.__name__: {
            "max_new_tokens": {"maximum": limits.max_new_tokens},
            "num_beams": {"maximum": limits.max_beams},
        },
        "StatusQuery": {"ids": {"maxItems": limits.max_bulk}},
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


class StatusQuery(BaseModel):
    """`POST /v1/statuses`: the statuses of many tasks in one call, optionally waiting (long poll)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ids: list[str] = Field(min_length=1, description="Task ids, at most `max_bulk` of the server's limits.")
    wait: float = Field(0.0, ge=0, description="Seconds to wait for the tasks to be final (long poll); at most "
                        "`max_wait_s` of the server's limits (a longer wait is cut to it).")
    until: Literal["all", "any"] = Field("all", description="Return when all tasks are final, or when any is.")

    @field_validator("ids")
    @classmethod
    def _ids_limit(cls, v: list[str], info: ValidationInfo) -> list[str]:
        limit = _limits(info).max_bulk
        if len(v) > limit:
            raise ValueError(f"{len(v)} ids; the limit is {limit}")
        return v


class StatusList(BaseModel):
    tasks: list[TaskStatus]
