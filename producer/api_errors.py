"""Every error the HTTP API returns has one shape: `{"error": {"type": ..., "message": ...}}`.

- `pagedq.shared.errors.PagedqError` (and the producer's own, and the body errors below) -> its `http_status`;
- request validation -> 422, the message naming each bad field (`requests.3.text: ...`);
- Redis or the broker unreachable -> 503;
- FastAPI's own HTTP errors (unknown route, wrong method) -> their status; a 405's `Allow` names every
  method the path serves.

The `*_RESPONSES` tables declare them in the OpenAPI schema, route by route.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from pagedq.producer.errors import InvalidJSON
from pagedq.producer.parsing import MAX_LISTED_ERRORS, describe_errors, error_location, error_text
from pagedq.shared.errors import PagedqError
from pagedq.shared.settings import Limits


class BodyTooLarge(PagedqError):
    """A request body over `limits.max_body_bytes`; refused before it is parsed."""

    http_status = 413


class UnsupportedMediaType(PagedqError):
    """A request body sent with a Content-Type other than JSON."""

    http_status = 415


class JSONTooDeep(InvalidJSON):
    """A JSON body that nests arrays and objects deeper than `limits.max_json_depth`; refused unparsed."""


#: The methods a 405's `Allow` header may name.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class ErrorDetail(BaseModel):
    type: str = Field(description="Error class, e.g. ValidationError, Unauthorized, TaskNotFound.")
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def _declared(*responses: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": what} for status, what in responses}


#: For the OpenAPI schema: what every /v1 route may answer.
V1_RESPONSES = _declared((401, "Missing or invalid API key"), (422, "Invalid request"), (503, "Redis unavailable"))
UNKNOWN_TASK = _declared((404, "Unknown task id"))
ALREADY_FINISHED = _declared((409, "Already finished"))


def body_responses(limits: Limits) -> dict[int | str, dict[str, Any]]:
    """What a route with a JSON body may answer besides `V1_RESPONSES`."""
    return _declared(
        (400, f"Body is not JSON, or nests arrays/objects deeper than {limits.max_json_depth} levels"),
        (404, "Unknown model, or no model for this request"),
        (413, f"Body larger than {limits.max_body_bytes} bytes"),
        (415, "Content-Type is not JSON"),
        (422, "Invalid request, or an unsupported language pair"),
    )


class ErrorResponse(JSONResponse):
    """JSON with everything non-ASCII escaped: an error may quote a client's own key, which can hold what
    UTF-8 cannot encode (a lone surrogate; JSON allows `"\\ud800"`)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(
    status_code: int, type: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return ErrorResponse({"error": {"type": type, "message": message, **extra}}, status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PagedqError)
    async def pagedq_error(request: Request, exc: PagedqError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        return error_response(exc.http_status, type(exc).__name__, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [
            {"loc": error_location(e["loc"]), "msg": error_text(e["msg"]), "type": e["type"]}
            for e in errors[:MAX_LISTED_ERRORS]
        ]
        return error_response(422, "ValidationError", describe_errors(errors, root="body"), details=details)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return error_response(exc.status_code, phrase.replace(" ", ""), str(exc.detail), headers)

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def broker_down(request: Request, exc: Exception) -> JSONResponse:
        return error_response(503, "ServiceUnavailable", f"Redis is unavailable: {exc}")


def _allowed_methods(request: Request) -> str:
    """Every method the request's path is served with. Starlette's 405 names only the methods of the first
    route that matched the path (GET of /v1/tasks/{id}, not DELETE), so ask every route about each method."""
    allowed = []
    for method in HTTP_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)
