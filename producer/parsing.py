"""Turning user input into validated request models, with explicit limits.

The request models check sizes against `Limits` taken from the validation context; every front end
validates through here so the service's limits apply whether a request came from Python, HTTP or the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, cast

from pydantic import BaseModel, TypeAdapter

from pagedq.shared.models import REQUEST_MODELS, TaskRequest, TaskType
from pagedq.shared.settings import Limits

RequestInput = TaskRequest | Mapping[str, Any]


def task_type_of(request: BaseModel) -> TaskType:
    """The task type a request model instance belongs to (TypeError for anything else)."""
    for task_type, model in REQUEST_MODELS.items():
        if type(request) is model:
            return task_type
    raise TypeError(f"not a pagedq request model: {type(request).__name__}")


def parse_request(task_type: TaskType, data: RequestInput, limits: Limits) -> TaskRequest:
    """Validate one request (a model instance is re-checked against `limits`); raises ValidationError."""
    model = REQUEST_MODELS[task_type]
    return cast(TaskRequest, model.model_validate(_plain(task_type, data), context={"limits": limits}))


def parse_requests(task_type: TaskType, items: Sequence[RequestInput], limits: Limits) -> list[TaskRequest]:
    """Validate many requests at once; one ValidationError lists every bad item by index (`3.text`)."""
    plain = [_plain(task_type, item) for item in items]
    return _list_adapter(task_type).validate_python(plain, context={"limits": limits})


@cache
def _list_adapter(task_type: TaskType) -> TypeAdapter[list[TaskRequest]]:
    items: Any = list[REQUEST_MODELS[task_type]]  # type: ignore[valid-type]
    return TypeAdapter(items)


def _plain(task_type: TaskType, data: RequestInput) -> Any:
    """A dict to validate: model instances are dumped so that `limits` are checked again."""
    if isinstance(data, BaseModel):
        if task_type_of(data) is not task_type:
            raise TypeError(f"a {type(data).__name__} cannot be submitted as a {task_type.value} task")
        return data.model_dump(exclude_unset=True)
    return data


#: How many field errors a message lists before "and N more".
MAX_LISTED_ERRORS = 10


def describe_errors(errors: Sequence[Any], item_labels: Sequence[str] | None = None, root: str = "input") -> str:
    """One readable line from pydantic error dicts: `text: must not be empty; requests.3.top_k: ...`.

    The API's `body` prefix is dropped; with `item_labels` a leading item index is replaced by its label
    (`line 3 of texts.txt: text: ...`); an error about the whole input is reported against `root`.
    """
    parts = [_describe(e, item_labels, root) for e in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_LISTED_ERRORS} more")
    return "; ".join(parts)


def error_location(loc: Sequence[int | str]) -> list[int | str]:
    return [part for part in loc if part != "body"]


def error_text(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _describe(error: Any, item_labels: Sequence[str] | None, root: str) -> str:
    loc = error_location(error["loc"])
    prefix = ""
    if item_labels is not None and loc and isinstance(loc[0], int) and loc[0] < len(item_labels):
        prefix, loc = f"{item_labels[loc[0]]}: ", loc[1:]
    where = ".".join(str(part) for part in loc) or root
    return f"{prefix}{where}: {error_text(error['msg'])}"
