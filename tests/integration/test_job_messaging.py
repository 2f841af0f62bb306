"""The worker health check, against a real RabbitMQ."""

import aio_pika
import pytest

from shared.jobs.messaging import celery_config, worker_check
from shared.settings import Settings


async def test_worker_check_fails_while_no_queue_exists(settings: Settings):
    with pytest.raises(RuntimeError, match="no queue"):
        await worker_check(settings)()


async def test_worker_check_passes_only_while_a_worker_consumes(settings: Settings):
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.jobs_queue, auto_delete=True)
        with pytest.raises(RuntimeError, match="no worker"):
            await worker_check(settings)()

        async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.reject(requeue=True)

        await queue.consume(ignore)

        await worker_check(settings)()


def test_celery_runs_late_acks_and_gives_back_tasks_of_a_lost_worker(settings):
    config = celery_config(settings)

    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["worker_cancel_long_running_tasks_on_connection_loss"] is True
    assert config["worker_send_task_events"] is True
    assert config["task_ignore_result"] is True
    assert "result_backend" not in config
