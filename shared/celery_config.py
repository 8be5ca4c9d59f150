"""Celery configuration shared by the producer (which only sends) and the worker (which runs tasks).

The producer never imports the worker's task functions: it sends by task name to the task type's queue.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pagedq.shared import kombu_compat
from pagedq.shared.models import TaskType
from pagedq.shared.settings import Settings, get_settings

#: Celery task name == queue name, one per task type.
TASK_NAMES: dict[TaskType, str] = {t: f"pagedq.{t.value}" for t in TaskType}
QUEUES: dict[TaskType, str] = dict(TASK_NAMES)
#: Tasks that carry many items of a bulk submission in one message, on the task type's queue.
BATCH_TASK_SUFFIX = ".batch"
BATCH_TASK_NAMES: dict[TaskType, str] = {t: f"pagedq.{t.value}{BATCH_TASK_SUFFIX}" for t in TaskType}
#: Redis priority steps: kombu maps priorities 0..9 onto these sub-queues per queue.
PRIORITY_STEPS = [0, 3, 6, 9]
#: kombu's separator between a queue's name and its priority step. Keep the default: Flower and the
#: `celery` CLI use it, and with another one they never see the workers' control replies.
PRIORITY_SEP = "\x06\x16"


def redis_queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a queue's messages, highest priority first (kombu's layout)."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def celery_priority(priority: int) -> int:
    """Map a pagedq priority (-100..100, lower first) onto kombu's Redis priority 0..9 (lower first)."""
    return max(0, min(9, round((priority + 100) * 9 / 200)))


def celery_config(settings: Settings) -> dict[str, object]:
    worst_case_s = settings.limits.max_timeout_s
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.backend_url,
        # JSON only, never pickle: messages and results are pydantic models dumped to JSON.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At-least-once: ack after the task ran, one message prefetched per thread, requeue if the worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Redis redelivers unacked messages after this, even to a live worker: keep it above the worst case.
        "broker_transport_options": {
            "visibility_timeout": max(settings.visibility_timeout_s, int(worst_case_s * 2)),
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
        },
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "result_expires": settings.result_ttl_s,
        # Results and states live in pagedq's task records (shared/records.py), written once by atomic
        # scripts; Celery's backend would store a second, overwritable copy (a redelivery could flip it).
        "task_ignore_result": True,
        "task_track_started": False,
        # Events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # One queue per task type, routed by task name.
        "task_queues": [Queue(q) for q in QUEUES.values()],
        "task_routes": {**{TASK_NAMES[t]: {"queue": QUEUES[t]} for t in TaskType},
                        **{BATCH_TASK_NAMES[t]: {"queue": QUEUES[t]} for t in TaskType}},
        "task_default_queue": QUEUES[TaskType.CLASSIFY],
        "broker_connection_retry_on_startup": True,
        # Producers (with their connections) a process keeps for publishing; kombu shares them between every
        # app of the process on the same broker: with Celery's default of 10, an eleventh thread submitting at
        # once waits for one (W5: 32 client threads, 20% of their samples waiting in the producer pool).
        "broker_pool_limit": settings.broker_pool_limit,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


def make_celery(settings: Settings | None = None, main: str = "pagedq") -> Celery:
    kombu_compat.reuse_clients()  # one Redis client per channel, not one per command (see the module)
    app = Celery(main)
    app.conf.update(celery_config(settings or get_settings()))
    return app
