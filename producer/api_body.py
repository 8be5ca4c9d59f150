"""Request bodies of the HTTP API: parsed and validated here, documented in the OpenAPI schema.

FastAPI validates a body parameter without a pydantic context, so the request models would fall back to
the process-wide limits instead of the app's `settings.limits`. These dependencies validate with the
app's limits instead, and `document_bodies` puts the same models in the OpenAPI schema (/docs).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.json_schema import models_json_schema

from producer.errors import InvalidJSON
from shared.errors import InvalidRequest
from shared.models import REQUEST_MODELS, TaskRequest, TaskType
from shared.settings import Limits


#: `{"requests": [...]}` body of `POST /v1/{type}/bulk`, per task type.
def _bulk_model(request_model: type[BaseModel]) -> type[BaseModel]:
    name = request_model.__name__.removesuffix("Request") + "BulkRequest"
    items: Any = list[request_model]  # type: ignore[valid-type]
    return create_model(name, __config__=ConfigDict(extra="forbid"), requests=(items, ...))


BULK_MODELS: dict[TaskType, type[BaseModel]] = {t: _bulk_model(m) for t, m in REQUEST_MODELS.items()}


def request_body(task_type: TaskType) -> Callable[[Request], Awaitable[TaskRequest]]:
    """Dependency: the body as the task type's request model, validated with the app's limits."""
    model = REQUEST_MODELS[task_type]

    async def parse(request: Request) -> TaskRequest:
        data = await _json(request)
        return _validate(model, data, _limits(request))  # type: ignore[return-value]

    return parse


def bulk_body(task_type: TaskType) -> Callable[[Request], Awaitable[list[TaskRequest]]]:
    """Dependency: the `requests` of a bulk body; at most `limits.max_bulk` of them (checked first)."""
    model = BULK_MODELS[task_type]

    async def parse(request: Request) -> list[TaskRequest]:
        data = await _json(request)
        limits = _limits(request)
        items = data.get("requests") if isinstance(data, dict) else None
        if isinstance(items, list) and len(items) > limits.max_bulk:
            raise InvalidRequest(f"a bulk submission holds at most {limits.max_bulk} requests; got {len(items)}")
        return _validate(model, data, limits).requests  # type: ignore[attr-defined,no-any-return]

    return parse


def body_schema(model_name: str) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is `model_name` (a schema `document_bodies` adds)."""
    ref = {"$ref": f"#/components/schemas/{model_name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document_bodies(app: FastAPI) -> None:
    """Add the request and bulk models to the app's OpenAPI components."""
    models = [*REQUEST_MODELS.values(), *BULK_MODELS.values()]
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _, defs = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None


def _validate(model: type[BaseModel], data: Any, limits: Limits) -> BaseModel:
    try:
        return model.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _limits(request: Request) -> Limits:
    return request.app.state.settings.limits  # type: ignore[no-any-return]
