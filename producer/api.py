"""The HTTP API: `uvicorn pagedq.producer.api:app` (settings from the `PAGEDQ_` environment) or `create_app(settings)`.

    POST   /v1/{classify,translate,qa}       one request       -> 202 SubmitResponse, Location: /v1/tasks/{id}
    POST   /v1/{classify,translate,qa}/bulk  {"requests": [...]} -> 202 BulkSubmitResponse (all or nothing)
    GET    /v1/tasks/{id}[?wait=S]           -> TaskStatus (404 for an unknown id); `wait`: long poll
    POST   /v1/statuses                  {"ids", "wait", "until"} -> {"tasks": [TaskStatus...]}
    GET    /v1/tasks/{id}/stream             Server-Sent Events: generated text, then the final status
    DELETE /v1/tasks/{id}                    -> cancel; TaskStatus (409 if already finished)
    GET    /healthz, /readyz                 liveness; readiness (Redis PING and a Celery worker ping)

/v1 needs an API key (`api_auth`); bodies are JSON within the body limits (`api_body`); errors have one
shape (`api_errors`) and every status a route answers is declared in its `responses`; nothing is enqueued
on any error.
"""

# No `from __future__ import annotations`: FastAPI must evaluate the route annotations, and those of the
# submit routes refer to each loop iteration's local `task_type`.
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles

from pagedq.producer.api_auth import require_api_key
from pagedq.producer.api_body import BULK_MODELS, body_schema, bulk_body, document_bodies, model_body, request_body
from pagedq.producer.api_errors import (
    ALREADY_FINISHED,
    UNKNOWN_TASK,
    V1_RESPONSES,
    body_responses,
    install_error_handlers,
)
from pagedq.producer.api_notices import DoneNotices
from pagedq.producer.api_wait import stream_events, wait_statuses
from pagedq.producer.service import TaskService
from pagedq.shared.models import (
    REQUEST_MODELS,
    BulkSubmitResponse,
    StatusList,
    StatusQuery,
    SubmitResponse,
    TaskRequest,
    TaskStatus,
    TaskType,
)
from pagedq.shared.settings import Limits, Settings, get_settings


def create_app(settings: Settings | None = None, service: TaskService | None = None) -> FastAPI:
    """The API app. `service` defaults to a TaskService on `settings` (default: from the environment), which
    the app closes at shutdown; a service passed in stays the caller's to close."""
    settings = settings or (service.settings if service is not None else get_settings())
    owned = service is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.notices.aclose()
        await app.state.aredis.aclose()
        if owned:
            app.state.service.close()

    app = FastAPI(
        title="pagedq",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by _docs_routes from local files: /docs works without internet
        redoc_url=None,
        description="Queue-driven NLP inference: submit classify / translate / qa tasks; wait for them by id "
        "(long poll), many at once, or stream generated text (Server-Sent Events).",
    )
    app.state.settings = settings
    app.state.service = service or TaskService(settings)
    # waits and streams are async (a waiting client holds no thread): their own Redis client
    app.state.aredis = aioredis.Redis.from_url(settings.backend_url, decode_responses=True, health_check_interval=10)
    app.state.notices = DoneNotices(app.state.aredis)  # every waiting request's notices, on one connection
    install_error_handlers(app)
    app.include_router(_health_routes())
    _docs_routes(app)
    app.include_router(
        _task_routes(settings.limits), prefix="/v1", dependencies=[Depends(require_api_key)], responses=V1_RESPONSES
    )
    document_bodies(app)
    return app


async def get_service(request: Request) -> TaskService:
    """async: FastAPI runs a plain `def` dependency in its threadpool, a hop per request for an attribute read."""
    return request.app.state.service  # type: ignore[no-any-return]


Service = Annotated[TaskService, Depends(get_service)]
Wait = Annotated[float, Query(ge=0, description="Seconds to wait for the task to be final (long poll); at most "
                              "`max_wait_s` of the server's limits (a longer wait is cut to it).")]


def json_errors(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """Error responses of a route whose success is not JSON (an event stream): their errors still are."""
    schema = {"$ref": "#/components/schemas/ErrorBody"}
    return {status: {"description": r["description"], "content": {"application/json": {"schema": schema}}}
            for status, r in responses.items()}


async def existing_task(task_id: str, service: Service) -> None:
    """404 before a stream starts (a started stream cannot change its status code)."""
    await run_in_threadpool(service.status, task_id)


def _task_routes(limits: Limits) -> APIRouter:
    router = APIRouter()
    for task_type in TaskType:
        _add_submit_routes(router, task_type, limits)

    @router.get("/tasks/{task_id}", tags=["tasks"], responses=UNKNOWN_TASK)
    async def get_task(task_id: str, service: Service, request: Request, wait: Wait = 0.0) -> TaskStatus:
        """The task's state; its result or error once final. With `wait`, answers as soon as the task is final
        (or after `wait` seconds, with the state then)."""
        wait = min(wait, limits.max_wait_s)
        [status] = await wait_statuses(service, request.app.state.notices, [task_id], wait)
        return status

    @router.post(
        "/statuses",
        tags=["tasks"],
        responses={**UNKNOWN_TASK, **body_responses(limits)},
        openapi_extra=body_schema(StatusQuery.__name__),
    )
    async def task_statuses(
        query: Annotated[StatusQuery, Depends(model_body(StatusQuery))], service: Service, request: Request
    ) -> StatusList:
        """Many statuses in one call, in the order of `ids` (404 names an unknown id). With `wait`, answers
        when all tasks (`until`: "all") or one of them ("any") are final, or after `wait` seconds."""
        wait = min(query.wait, limits.max_wait_s)
        tasks = await wait_statuses(service, request.app.state.notices, query.ids, wait, query.until == "any")
        return StatusList(tasks=tasks)

    @router.get(
        "/tasks/{task_id}/stream",
        tags=["tasks"],
        response_class=EventSourceResponse,
        responses={**json_errors({**V1_RESPONSES, **UNKNOWN_TASK}),
                   200: {"description": "`token` {text} events, `reset`, then `status`"}},
        dependencies=[Depends(existing_task)],
    )
    async def stream_task(task_id: str, service: Service, request: Request) -> AsyncIterator[ServerSentEvent]:
        """The task's text as it is generated (`generation.stream`: token by token on causal LMs; otherwise in
        one piece when it finishes), then its final status. `Last-Event-ID` resumes after an event. A stream
        longer than `max_stream_s` ends with the status as it is then."""
        state = request.app.state
        events = stream_events(service, state.aredis, state.notices, task_id, request.headers.get("last-event-id"),
                               request.is_disconnected, limits.max_stream_s)
        async for event in events:
            yield event

    @router.delete(
        "/tasks/{task_id}",
        tags=["tasks"],
        responses={**UNKNOWN_TASK, **ALREADY_FINISHED},
    )
    def cancel_task(task_id: str, service: Service) -> TaskStatus:
        """Cancel a queued or running task; the worker stops it at its next engine step."""
        return service.cancel(task_id)

    return router


def _add_submit_routes(router: APIRouter, task_type: TaskType, limits: Limits) -> None:
    name = task_type.value
    model, bulk_model = REQUEST_MODELS[task_type], BULK_MODELS[task_type]
    responses = body_responses(limits)

    @router.post(
        f"/{name}",
        status_code=202,
        tags=[name],
        summary=f"Submit a {name} task",
        openapi_extra=body_schema(model.__name__),
        responses=responses,
    )
    def submit(
        response: Response, request: Annotated[TaskRequest, Depends(request_body(task_type))], service: Service
    ) -> SubmitResponse:
        submitted = service.submit(task_type, request)
        response.headers["Location"] = submitted.location
        return submitted

    @router.post(
        f"/{name}/bulk",
        status_code=202,
        tags=[name],
        summary=f"Submit many {name} tasks",
        openapi_extra=body_schema(bulk_model.__name__),
        responses=responses,
    )
    def submit_bulk(
        requests: Annotated[list[TaskRequest], Depends(bulk_body(task_type))], service: Service
    ) -> BulkSubmitResponse:
        """All or nothing: if any request is invalid, none is enqueued."""
        return BulkSubmitResponse(tasks=service.submit_bulk(task_type, requests))


def _health_routes() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        """200 while the process lives."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "Redis or every worker unreachable"}})
    def readyz(service: Service) -> JSONResponse:
        """200 when Redis answers PING and at least one worker holds a live lease with its engine running
        (read from Redis: no broadcast, answered in milliseconds)."""
        checks = _readiness(service)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
        )

    return router


#: Swagger UI 5 (OpenAPI 3.1) and ReDoc 2 as shipped in the `fastapi-offline` package (the `api` extra).
DOCS_ASSETS = Path(str(resources.files("fastapi_offline") / "static"))
DOCS_STATIC = "/docs-static"


def _docs_routes(app: FastAPI) -> None:
    """/docs and /redoc from installed files instead of a CDN (FastAPI's "self-hosting JavaScript and CSS
    for docs" recipe), so they work without internet."""
    app.mount(DOCS_STATIC, StaticFiles(directory=DOCS_ASSETS), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )


def _readiness(service: TaskService) -> dict[str, dict[str, Any]]:
    try:
        service.ping_redis()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported as such
        return {
            "redis": {"ok": False, "detail": f"Redis did not answer PING: {exc}"},
            "workers": {"ok": False, "detail": "not checked: Redis is down"},
        }
    try:
        workers = service.ready_workers()
    except Exception as exc:  # noqa: BLE001
        workers, error = [], f"reading the worker leases failed: {exc}"
    else:
        error = "no worker holds a live lease with its engine running"
    worker_check: dict[str, Any] = {"ok": bool(workers), "workers": workers}
    if not workers:
        worker_check["detail"] = error
    return {"redis": {"ok": True}, "workers": worker_check}


def __getattr__(name: str) -> Any:
    """`pagedq.producer.api.app`, built from the environment on first use (so importing this module is cheap)."""
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
