"""The Celery app of the worker: `celery -A workers worker`."""

import logging
import time
from typing import Any
from uuid import UUID

from celery.exceptions import Reject
from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)

from shared.db import name_sessions
from shared.errors import Unavailable
from shared.jobs.messaging import RUN_JOB_TASK, celery_app
from shared.logging import configure_logging
from shared.settings import get_settings
from workers.runtime import close_runtime, current_runtime

log = logging.getLogger(__name__)
UNAVAILABLE_RETRY_S = 2.0

app = celery_app(get_settings(), name="helixnet-workers", worker=True)


@setup_logging.connect  # type: ignore[untyped-decorator]
def _configure_logging(**_: Any) -> None:
    configure_logging(get_settings())


@worker_init.connect  # type: ignore[untyped-decorator]
def _name_sessions(**_: Any) -> None:
    # In the main process, before the pool's processes are forked from it.
    name_sessions("worker")


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _open_runtime(**_: Any) -> None:
    current_runtime()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _close_runtime(**_: Any) -> None:
    close_runtime()


@app.task(name=RUN_JOB_TASK)  # type: ignore[untyped-decorator]
def run_job(job_id: str) -> str:
    """Run job `job_id` if it still needs running; every outcome is an event."""
    try:
        return current_runtime().run(current_runtime().runner.run(UUID(job_id)))
    except Unavailable as exc:
        # PostgreSQL is down and nothing was decided: give the delivery back to
        # the queue after a pause and take it again. Not `self.retry`, which
        # publishes a copy: the worker publishes without confirms, so a copy could
        # be lost, while a requeued delivery stays in the broker all along.
        log.warning("job store unavailable, retrying", extra={"job_id": job_id})
        time.sleep(UNAVAILABLE_RETRY_S)
        raise Reject(exc, requeue=True) from exc
