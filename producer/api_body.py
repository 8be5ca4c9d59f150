"""Request bodies of the HTTP API: read, parsed and validated here, documented in the OpenAPI schema.

After the API key, in this order, so that nothing big or malformed is ever parsed:

    Content-Type JSON (else 415) -> at most `max_body_bytes` read (413) -> arrays/objects nested at most
    `max_json_depth` deep (400) -> UTF-8 JSON (400) -> the request model with the app's limits (422)

FastAPI validates a body parameter without a pydantic context, so the request models would fall back to
the process-wide limits instead of the app's `settings.limits`. These dependencies validate with the
app's limits instead, and strictly: `"truncate": 0` or `"priority": "5"` is not JSON Schema's boolean or
integer, so it is a 422, not a guess. `document_bodies` puts the same models in the OpenAPI schema (/docs)
with those limits stated (`maxLength`, `maximum`, `maxItems`) and the registry's language pairs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.json_schema import models_json_schema

from pagedq.producer.api_errors import BodyTooLarge, JSONTooDeep, UnsupportedMediaType
from pagedq.producer.errors import InvalidJSON
from pagedq.shared.errors import InvalidRequest
from pagedq.shared.models import REQUEST_MODELS, StatusQuery, TaskRequest, TaskType, TranslateRequest, limits_schema
from pagedq.shared.registry import ModelSpec, Registry
from pagedq.shared.settings import Limits


#: `{"requests": [...]}` body of `POST /v1/{type}/bulk`, per task type.
def _bulk_model(request_model: type[BaseModel]) -> type[BaseModel]:
    name = request_model.__name__.removesuffix("Request") + "BulkRequest"
    items: Any = list[request_model]  # type: ignore[valid-type]
    return create_model(name, __config__=ConfigDict(extra="forbid"), requests=(items, ...))


BULK_MODELS: dict[TaskType, type[BaseModel]] = {t: _bulk_model(m) for t, m in REQUEST_MODELS.items()}
#: Other JSON bodies the API takes (documented and validated the same way).
EXTRA_BODY_MODELS: list[type[BaseModel]] = [StatusQuery]
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


#: Bodies up to this size are parsed and validated on the event loop (tens of microseconds, less than the hop
#: to the threadpool and back); larger ones in the threadpool, so that a big bulk does not hold up other requests.
INLINE_BODY_BYTES = 16 * 1024


async def _parsed(raw: bytes, parse: Callable[..., T], *args: Any) -> T:
    """`parse(*args)` for the body `raw`: on the event loop up to `INLINE_BODY_BYTES`, else in the threadpool."""
    if len(raw) <= INLINE_BODY_BYTES:
        return parse(*args)
    return await run_in_threadpool(parse, *args)


def request_body(task_type: TaskType) -> Callable[[Request], Awaitable[TaskRequest]]:
    """Dependency: the body as the task type's request model, validated with the app's limits."""
    model = REQUEST_MODELS[task_type]

    async def parse(request: Request) -> TaskRequest:
        limits = _limits(request)
        raw = await read_body(request, limits)
        return await _parsed(raw, _validate_request, model, raw, limits)

    return parse


def bulk_body(task_type: TaskType) -> Callable[[Request], Awaitable[list[TaskRequest]]]:
    """Dependency: the `requests` of a bulk body; at most `limits.max_bulk` of them (checked first)."""
    model = BULK_MODELS[task_type]

    async def parse(request: Request) -> list[TaskRequest]:
        limits = _limits(request)
        raw = await read_body(request, limits)
        return await _parsed(raw, _validate_bulk, model, raw, limits)

    return parse


def model_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """Dependency: the body as `model` (any other JSON body a route takes), validated with the app's limits."""

    async def parse(request: Request) -> M:
        limits = _limits(request)
        raw = await read_body(request, limits)
        return cast(M, await _parsed(raw, lambda: _validate(model, parse_json(raw, limits), limits)))

    return parse


def body_schema(model_name: str) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is `model_name` (a schema `document_bodies` adds)."""
    ref = {"$ref": f"#/components/schemas/{model_name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document_bodies(app: FastAPI) -> None:
    """Add the request and bulk models to the app's OpenAPI components, stating the app's limits and the
    language pairs of its registry."""
    models = [*REQUEST_MODELS.values(), *BULK_MODELS.values(), *EXTRA_BODY_MODELS]
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _, defs = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            components = defs.get("$defs", {})
            _state_limits(components, app.state.settings.limits)
            _state_language_pairs(components, app.state.service.registry)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _state_limits(components: dict[str, Any], limits: Limits) -> None:
    """Merge the keywords of `limits` into the component schemas of the request and bulk models."""
    for model_name, fields in limits_schema(limits).items():
        for field, keywords in fields.items():
            components[model_name]["properties"][field].update(keywords)
    for bulk_model in BULK_MODELS.values():
        components[bulk_model.__name__]["properties"]["requests"]["maxItems"] = limits.max_bulk


def _state_language_pairs(components: dict[str, Any], registry: Registry | None) -> None:
    """What else is a 422 UnsupportedLanguagePair: a request naming a translation model must fit one of its
    pairs, any other one a pair of some translation model (without a registry the API checks no pairs)."""
    models = [m for m in registry.models.values() if m.task is TaskType.TRANSLATE] if registry else []
    if not models:
        return
    others = {"properties": {"model": {"not": {"enum": [m.name for m in models]}}}}
    branches = [{"allOf": [others, _pairs_schema(models)]}]
    for m in models:
        named = {"properties": {"model": {"const": m.name}}, "required": ["model"]}
        branches.append({"allOf": [named, _pairs_schema([m])]})
    components[TranslateRequest.__name__]["anyOf"] = branches


def _pairs_schema(models: list[ModelSpec]) -> dict[str, Any]:
    """`source_lang` and `target_lang` (null: either) as one pair the models serve; {} when one serves all."""
    if any(not m.languages for m in models):
        return {}
    pairs = sorted({tuple(pair.split("-")) for m in models for pair in m.languages})
    langs = [{"properties": {"source_lang": {"enum": [s, None]}, "target_lang": {"enum": [t, None]}}} for s, t in pairs]
    return {"anyOf": langs}


# -- reading and parsing ----------------------------------------------------------------------------------

#: A JSON string, escapes included (unrolled: no per-character alternation).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPENERS = frozenset(b"[{")


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body of a JSON request, at most `limits.max_body_bytes` of it (413 as soon as it is more)."""
    _check_media_type(request.headers.get("content-type"))
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
    return bytes(body)


def _check_media_type(content_type: str | None) -> None:
    """JSON only: `application/json` or `application/*+json`, with any parameters. A body sent without a
    Content-Type is read as JSON, as FastAPI does."""
    if content_type is None:
        return
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
        return
    raise UnsupportedMediaType(f"send the body as JSON (Content-Type: application/json), not {content_type!r}")


def nesting_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether `raw` nests arrays and objects more than `limit` deep (`[]` is 1), counted without parsing:
    strings are cut out, then the brackets left are counted, stopping at the first one too deep.

    Malformed JSON may count wrong; the parser rejects it anyway."""
    depth = 0
    for byte in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        depth += 1 if byte in _OPENERS else -1
        if depth > limit:
            return True
    return False


def parse_json(raw: bytes, limits: Limits) -> Any:
    """UTF-8 JSON (RFC 8259) nested at most `limits.max_json_depth` deep; InvalidJSON otherwise."""
    if nesting_depth_exceeds(raw, limits.max_json_depth):
        raise JSONTooDeep(f"the request body nests arrays/objects more than {limits.max_json_depth} levels deep")
    try:
        return json.loads(raw.decode("utf-8"), parse_float=_json_number, parse_constant=_reject_constant)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None


def _json_number(text: str) -> int | float:
    """JSON has one number type: an integral one (`5.0`, `1e3`) is an integer, as JSON Schema counts it."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _validate_request(model: type[BaseModel], raw: bytes, limits: Limits) -> TaskRequest:
    return cast(TaskRequest, _validate(model, parse_json(raw, limits), limits))


def _validate_bulk(model: type[BaseModel], raw: bytes, limits: Limits) -> list[TaskRequest]:
    data = parse_json(raw, limits)
    items = data.get("requests") if isinstance(data, dict) else None
    if isinstance(items, list) and len(items) > limits.max_bulk:
        raise InvalidRequest(f"a bulk submission holds at most {limits.max_bulk} requests; got {len(items)}")
    return _validate(model, data, limits).requests  # type: ignore[attr-defined,no-any-return]


def _validate(model: type[BaseModel], data: Any, limits: Limits) -> BaseModel:
    try:
        return model.model_validate(data, strict=True, context={"limits": limits})
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _limits(request: Request) -> Limits:
    return request.app.state.settings.limits  # type: ignore[no-any-return]
