"""A bare Celery app, the benchmark's baseline: a no-op task and an rpc:// result.

It runs on the same broker and with the same worker options as the job worker
(`worker_config`), minus everything HelixNet Core adds:
`celery -A tests.benchmarks.bare_celery worker`.
"""

from typing import Any

from celery import Celery

from shared.jobs.messaging import worker_config
from shared.settings import get_settings

BARE_TASK = "bench.noop"


def bare_queue(jobs_queue: str) -> str:
    return f"{jobs_queue}.bare"


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("bench-bare", set_as_current=False)
    config: dict[str, Any] = worker_config(settings)
    config.pop("task_queues")
    config.update(
        task_default_queue=bare_queue(settings.jobs_queue),
        task_routes={BARE_TASK: {"queue": bare_queue(settings.jobs_queue)}},
        task_ignore_result=False,
        result_backend="rpc://",
    )
    app.conf.update(config)
    return app


app = make_app()


@app.task(name=BARE_TASK)
def noop() -> None:
    return None
