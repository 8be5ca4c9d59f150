"""Settings for every pagedq process, read from the environment with the `PAGEDQ_` prefix.

Example: `PAGEDQ_REDIS_URL=redis://redis:6379/0 PAGEDQ_RESULT_TTL_S=3600`. Lists are JSON
(`PAGEDQ_API_KEYS='["k1","k2"]'`) or comma-separated.

Secrets can come from files instead of the environment (compose/Docker/Kubernetes secrets): a file named
like the variable in lower case, in `PAGEDQ_SECRETS_DIR` (default `/run/secrets`, where compose mounts them),
e.g. `/run/secrets/pagedq_api_keys` or `/run/secrets/pagedq_redis_password`. `PAGEDQ_REDIS_PASSWORD` (or its
file) is put into the Redis URLs that carry no password of their own, so the URLs themselves hold no secret.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: torch intra-op threads of a model's engine steps: a count, or "auto" (measured per step size by the engine:
#: pagedq.worker.engine.threads)
IntraOpThreads = Annotated[int, Field(gt=0)] | Literal["auto"]


class Limits(BaseModel):
    """Input limits enforced by the request models (client, API and worker alike) and the HTTP API's body."""

    max_text_chars: int = Field(10_000, gt=0, description="Longest `text` or `question`, in characters.")
    max_context_chars: int = Field(100_000, gt=0, description="Longest QA `context`, in characters.")
    max_new_tokens: int = Field(512, gt=0, description="Largest `max_new_tokens` a request may ask for.")
    max_beams: int = Field(8, gt=0, description="Largest `num_beams`.")
    max_timeout_s: float = Field(3_600.0, gt=0, description="Longest `timeout_s` a request may ask for.")
    max_bulk: int = Field(10_000, gt=0, description="Most inputs in one bulk submission.")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="HTTP API: largest request body, in bytes (413 above it, before parsing)."
    )
    max_json_depth: int = Field(
        32,
        gt=0,
        le=256,  # the JSON parser recurses per level: far below Python's recursion limit
        description="HTTP API: deepest nesting of JSON arrays and objects in a body (checked before parsing).",
    )
    max_wait_s: float = Field(
        60.0, gt=0, description="HTTP API: longest long poll (`wait`); a longer one is cut to this."
    )
    max_stream_s: float = Field(
        3_600.0, gt=0, description="HTTP API: longest task stream; it then ends with the current status "
        "(reconnect with Last-Event-ID to go on)."
    )


def _secrets_dir() -> str | None:
    """Where secret files are read from, if that directory exists (pydantic-settings warns otherwise)."""
    path = Path(os.environ.get("PAGEDQ_SECRETS_DIR", "/run/secrets"))
    return str(path) if path.is_dir() else None


def with_password(url: str, password: str) -> str:
    """`url` with `password` in it, unless it names one already (percent-encoded: any character works)."""
    parts = urlsplit(url)
    if parts.password is not None or not parts.hostname:
        return url
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAGEDQ_", env_nested_delimiter="__", extra="ignore",
                                      secrets_dir=_secrets_dir())

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Broker and result backend.")
    result_redis_url: str | None = Field(None, description="Result backend, if not `redis_url`.")
    redis_password: SecretStr | None = Field(
        None, description="Password put into the Redis URLs that carry none (best from a secret file)."
    )
    result_ttl_s: int = Field(24 * 3600, gt=0, description="How long results and task records are kept.")
    visibility_timeout_s: int = Field(
        2 * 3600, gt=0, description="Redis redelivers an unacked message after this; keep it above the worst-case task."
    )
    default_timeout_s: float = Field(600.0, gt=0, description="Deadline of a request that names none.")
    drain_timeout_s: float = Field(
        20.0, ge=0, description="Warm shutdown (SIGTERM): how long in-flight tasks may finish before the rest is "
        "handed back to the queue. Keep it under the orchestrator's grace period (compose: stop_grace_period)."
    )
    lease_ttl_s: float = Field(
        6.0, gt=0, description="A worker whose heartbeat is older than this is dead: its tasks are queued again."
    )
    heartbeat_interval_s: float = Field(1.0, gt=0, description="How often a worker renews its lease.")
    reconcile_interval_s: float = Field(
        2.0, gt=0, description="How often the reconciler looks for dead workers' tasks and lost messages."
    )
    lost_message_grace_s: float = Field(
        5.0, gt=0, description="A task with no message anywhere for this long is sent again (same id)."
    )
    limits: Limits = Field(default_factory=Limits)
    bulk_message_items: int = Field(
        512, gt=0, description="A bulk submission travels as messages of up to this many items (each keeps its own "
        "id): the first of 64 (one engine step's worth at the default request cap), each next one twice the last, "
        "and at most 1,000,000 characters of text each (README, W5)."
    )

    registry_path: Path | None = Field(None, description="Model registry file (TOML); see README.")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Accepted API keys.")
    auth_enabled: bool = Field(True, description="Require `X-API-Key` on the HTTP API.")

    worker_concurrency: int = Field(64, gt=0, description="Celery threads per worker (>= 2x the largest batch).")
    broker_pool_limit: int = Field(
        64, gt=0, description="Broker connections a process keeps for sending (Celery's `broker_pool_limit`, "
        "shared by every client of the process): at least the threads that submit at once (Celery's default: 10)."
    )
    consumer_read_max: int = Field(
        16, gt=0, description="Most messages the worker's consumer takes per Redis read, within its prefetch credit "
        "(1: one per BRPOP, as kombu does); a read takes at most one bulk batch message (worker/consumer_io.py)."
    )
    metrics_port: int = Field(9464, ge=0, description="Worker Prometheus port; 0 disables.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (models may override).")
    max_batch_tokens: int = Field(4096, gt=0, description="Engine token budget per step.")
    max_running_requests: int = Field(64, gt=0, description="Engine cap on requests in one step.")
    kv_cache_bytes: int | None = Field(None, gt=0, description="KV pool size in bytes (default: a share of memory).")
    cpu_prepack_linear: bool = Field(
        True, description="CPU models: pre-pack linear weights for oneDNN (faster, one more weight copy in memory)."
    )
    intra_op_threads: IntraOpThreads | None = Field(
        "auto", description="CPU threads of one engine step's matrix products, for models whose registry entry "
        "sets none (`intra_op_threads`): a count, or `auto` (the default: torch's count -- one per core, or "
        "OMP_NUM_THREADS -- below the engine's request cap; at the cap, the fewest threads measured within 5% "
        "of the fastest per token, per step size)."
    )

    engine_process: bool = Field(
        True, description="Step the models in an engine-core process of the worker's own, apart from the "
        "Celery process that serves the queue (each with its own GIL: worker/engine/process.py)."
    )
    engine_threads: Literal["per-model", "shared"] = Field(
        "per-model", description="`per-model`: each model's steps run in an engine thread of its own, side by "
        "side with the other models' (the cores split between the models with work); `shared`: one engine "
        "thread steps every model in turn."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _urls_with_password(self) -> Settings:
        if self.redis_password is not None:
            password = self.redis_password.get_secret_value().strip()  # a secret file ends with a newline
            self.redis_url = with_password(self.redis_url, password)
            if self.result_redis_url is not None:
                self.result_redis_url = with_password(self.result_redis_url, password)
        return self

    @property
    def backend_url(self) -> str:
        return self.result_redis_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
