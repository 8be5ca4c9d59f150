"""The HTTP API: `uvicorn producer.api:app` (settings from the `PAGEDQ_` environment) or `create_app(settings)`.

    POST   /v1/{classify,translate,qa}       one request       -> 202 SubmitResponse, Location: /v1/tasks/{id}
    POST   /v1/{classify,translate,qa}/bulk  {"requests": [...]} -> 202 BulkSubmitResponse (all or nothing)
    GET    /v1/tasks/{id}                    -> TaskStatus (404 for an unknown id)
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
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from producer.api_auth import require_api_key
from producer.api_body import BULK_MODELS, body_schema, bulk_body, document_bodies, request_body
from producer.api_errors import (
    ALREADY_FINISHED,
    UNKNOWN_TASK,
    V1_RESPONSES,
    body_responses,
    install_error_handlers,
)
from producer.service import TaskService
from shared.models import REQUEST_MODELS, BulkSubmitResponse, SubmitResponse, TaskRequest, TaskStatus, TaskType
from shared.settings import Limits, Settings, get_settings

#: How long /readyz waits for a Celery worker to answer its ping.
WORKER_PING_TIMEOUT_S = 1.0


def create_app(settings: Settings | None = None, service: TaskService | None = None) -> FastAPI:
    """The API app. `service` defaults to a TaskService on `settings` (default: from the environment), which
    the app closes at shutdown; a service passed in stays the caller's to close."""
    settings = settings or (service.settings if service is not None else get_settings())
    owned = service is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            app.state.service.close()

    app = FastAPI(
        title="pagedq",
        version="0.1.0",
        lifespan=lifespan,
        description="Queue-driven NLP inference: submit classify / translate / qa tasks, poll by id.",
    )
    app.state.settings = settings
    app.state.service = service or TaskService(settings)
    install_error_handlers(app)
    app.include_router(_health_routes())
    app.include_router(
        _task_routes(settings.limits), prefix="/v1", dependencies=[Depends(require_api_key)], responses=V1_RESPONSES
    )
    document_bodies(app)
    return app


def get_service(request: Request) -> TaskService:
    return request.app.state.service  # type: ignore[no-any-return]


Service = Annotated[TaskService, Depends(get_service)]


def _task_routes(limits: Limits) -> APIRouter:
    router = APIRouter()
    for task_type in TaskType:
        _add_submit_routes(router, task_type, limits)

    @router.get("/tasks/{task_id}", tags=["tasks"], responses=UNKNOWN_TASK)
    def get_task(task_id: str, service: Service) -> TaskStatus:
        """The task's state; its result or error once final."""
        return service.status(task_id)

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
        """200 when Redis answers PING and at least one Celery worker answers a ping within ~1 s."""
        checks = _readiness(service)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
        )

    return router


def _readiness(service: TaskService) -> dict[str, dict[str, Any]]:
    try:
        service.ping_redis()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported as such
        return {
            "redis": {"ok": False, "detail": f"Redis did not answer PING: {exc}"},
            "workers": {"ok": False, "detail": "not checked: Redis is down"},
        }
    try:
        workers = service.ping_workers(WORKER_PING_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001
        workers, error = [], f"worker ping failed: {exc}"
    else:
        error = f"no Celery worker answered a ping within {WORKER_PING_TIMEOUT_S} s"
    worker_check: dict[str, Any] = {"ok": bool(workers), "workers": workers}
    if not workers:
        worker_check["detail"] = error
    return {"redis": {"ok": True}, "workers": worker_check}


def __getattr__(name: str) -> Any:
    """`producer.api.app`, built from the environment on first use (so importing this module is cheap)."""
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
