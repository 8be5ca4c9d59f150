"""Every error the HTTP API returns has one shape: `{"error": {"type": ..., "message": ...}}`.

- `shared.errors.PagedqError` (and the producer's own) -> its `http_status`;
- request validation -> 422, the message naming each bad field (`requests.3.text: ...`);
- Redis or the broker unreachable -> 503;
- FastAPI's own HTTP errors (unknown route, wrong method) -> their status.
"""

from __future__ import annotations

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

from producer.parsing import MAX_LISTED_ERRORS, describe_errors, error_location, error_text
from shared.errors import PagedqError


class ErrorDetail(BaseModel):
    type: str = Field(description="Error class, e.g. ValidationError, Unauthorized, TaskNotFound.")
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


#: For the OpenAPI schema of the /v1 routes.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in [
        (400, "Body is not JSON"),
        (401, "Missing or invalid API key"),
        (422, "Invalid request"),
        (503, "Redis unavailable"),
    ]
}


def error_response(
    status_code: int, type: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "message": message, **extra}}, status_code, headers=headers)


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
        return error_response(exc.status_code, phrase.replace(" ", ""), str(exc.detail), exc.headers)

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def broker_down(request: Request, exc: Exception) -> JSONResponse:
        return error_response(503, "ServiceUnavailable", f"Redis is unavailable: {exc}")
