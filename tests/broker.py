"""RabbitMQ helpers for tests: a queue that records what an exchange receives."""

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from shared.settings import Settings


@asynccontextmanager
async def recording_queue(
    settings: Settings, binding: str = "#"
) -> AsyncIterator[AbstractQueue]:
    """A durable queue bound to the events exchange; everything deleted afterwards."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            f"{settings.events_exchange}.recorder", durable=True
        )
        await queue.bind(exchange, binding)
        yield queue
    finally:
        await connection.close()
        await delete_broker_objects(settings)


async def delete_broker_objects(settings: Settings, *queues: str) -> None:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        for name in [f"{settings.events_exchange}.recorder", *queues]:
            await channel.queue_delete(name)
        await channel.exchange_delete(settings.events_exchange)


async def drain(
    settings: Settings, count: int, *, timeout_s: float = 60
) -> list[tuple[dict[str, Any], AbstractIncomingMessage]]:
    """Take `count` messages from the recorder queue (over a fresh connection)."""
    received: list[tuple[dict[str, Any], AbstractIncomingMessage]] = []
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection, asyncio.timeout(timeout_s):
        channel = await connection.channel()
        queue = await channel.get_queue(f"{settings.events_exchange}.recorder")
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                received.append((json.loads(message.body), message))
                if len(received) >= count:
                    break
    return received


async def queued(settings: Settings) -> int:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            f"{settings.events_exchange}.recorder", durable=True
        )
        return queue.declaration_result.message_count or 0


@contextmanager
def rabbitmq_stopped() -> Any:
    """Stop the RabbitMQ application; always start it again."""
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True)
        subprocess.run(
            ["rabbitmqctl", "await_startup"], check=False, capture_output=True
        )


# What settings_for() names its exchanges and queues: helix.events.test.<suffix>,
# helix.jobs.test.<suffix>, and queues named after those.
_TEST_OBJECT = re.compile(r"^helix\.(?:events|jobs)\.test\.([0-9a-f]{8})(?:\.|$)")


def _listed(kind: str) -> list[str]:
    """The names of every queue or exchange, from rabbitmqctl (none if absent)."""
    try:
        listed = subprocess.run(
            ["rabbitmqctl", f"list_{kind}", "-q", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return listed.stdout.split() if listed.returncode == 0 else []


async def delete_test_objects(rabbitmq_url: str, suffixes: set[str]) -> None:
    """Delete the queues and exchanges of the test settings with these suffixes,
    so runs leave nothing behind on the machine's broker."""

    def ours(name: str) -> bool:
        match = _TEST_OBJECT.match(name)
        return match is not None and match[1] in suffixes

    queues = [name for name in _listed("queues") if ours(name)]
    exchanges = [name for name in _listed("exchanges") if ours(name)]
    if not (queues or exchanges):
        return
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
