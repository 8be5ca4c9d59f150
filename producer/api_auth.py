"""API-key authentication for the /v1 routes, as a FastAPI dependency.

A key is accepted in `X-API-Key: <key>` or `Authorization: Bearer <key>`. With `auth_enabled` and no keys
configured every request is refused (fail closed) with a message that says so.
"""

from __future__ import annotations

from secrets import compare_digest
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from pagedq.producer.errors import Unauthorized
from pagedq.shared.settings import Settings

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of PAGEDQ_API_KEYS.")
BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`, same keys as X-API-Key.")


async def require_api_key(  # async: a plain `def` dependency costs a hop to the threadpool per request
    request: Request,
    api_key: Annotated[str | None, Security(API_KEY_HEADER)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> None:
    """Raise Unauthorized unless auth is disabled or a configured key was sent."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return
    if not settings.api_keys:
        raise Unauthorized("authentication is enabled but no API keys are configured (set PAGEDQ_API_KEYS)")
    given = api_key or (bearer.credentials if bearer else None)
    if not given:
        raise Unauthorized("missing API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
    if not _is_known(given, settings.api_keys):
        raise Unauthorized("invalid API key")


def _is_known(given: str, keys: list[str]) -> bool:
    """Constant-time comparison against every key (no early exit that would leak which one matched)."""
    found = False
    for key in keys:
        found |= compare_digest(given.encode(), key.encode())
    return found
