"""How jobs travel over RabbitMQ as Celery tasks, for the senders and the worker.

The dispatcher sends the task by name, so it never imports the worker; both build
their Celery app here so that they agree on the broker, the queue and the options.
"""

from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from shared.settings import Settings

RUN_JOB_TASK = "helix.jobs.run"
# The dispatcher's checkpoint, and the events it turns into tasks.
DISPATCHER = "dispatcher"
DISPATCHED_TYPES = ("JobSubmitted", "JobRetryScheduled")


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.rabbitmq_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # The publisher waits for the broker's confirm: a sent task is stored.
        "broker_transport_options": {"confirm_publish": True},
        "task_default_queue": settings.jobs_queue,
        "task_queues": [Queue(settings.jobs_queue, durable=True)],  # type: ignore[no-untyped-call]
        "task_routes": {RUN_JOB_TASK: {"queue": settings.jobs_queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        # Results travel as events in the log, not through a result backend.
        "task_ignore_result": True,
        # A task is acknowledged when it ends, and given back if its worker dies,
        # so a job is never lost to a crash; the job stream makes reruns harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Flower sees every task.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


def worker_config(settings: Settings) -> dict[str, Any]:
    """The worker's options: those above, less publisher confirms.

    A worker publishes only monitoring events (task-received, -started,
    -succeeded, heartbeats), which are transient; waiting for the broker to
    confirm each one held up every task. It never sends a task: a delivery it
    cannot run yet goes back to the queue instead (`workers.app`).
    """
    config = celery_config(settings)
    config["broker_transport_options"] = {"confirm_publish": False}
    return config


def celery_app(
    settings: Settings, name: str = "helixnet", *, worker: bool = False
) -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(worker_config(settings) if worker else celery_config(settings))
    return app


def worker_check(settings: Settings) -> Callable[[], Awaitable[None]]:
    """A health check: some worker consumes the jobs queue (a passive declare)."""

    async def check() -> None:
        connection = await aio_pika.connect(settings.rabbitmq_url, timeout=2)
        async with connection:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(settings.jobs_queue, passive=True)
            except aio_pika.exceptions.ChannelClosed as exc:
                raise RuntimeError(f"no queue {settings.jobs_queue}") from exc
            result = queue.declaration_result
            if not result.consumer_count:
                raise RuntimeError(f"no worker consumes {settings.jobs_queue}")

    return check
