"""The job dispatcher: turns JobSubmitted and JobRetryScheduled into Celery tasks.

It consumes its own durable queue, `<events_exchange>.dispatcher`, bound to those
two event types, and sends the worker's task by name (`helix.jobs.run`, with the
job id) to `settings.jobs_queue`; a retry is sent with the ETA the event names.
A message is acknowledged only after the broker confirmed the task, and the
"dispatcher" checkpoint then moves past it, so a crash sends some tasks twice and
never loses one. Sending twice is harmless: the worker runs a job at most once.

On start, and whenever it has been idle a while, the dispatcher also reads the
log after its checkpoint, so an event it never received from the broker (the
queue did not exist yet when the relay published it) is dispatched all the same.
"""

import asyncio
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.relay import declare_exchange, raise_if_disconnected
from shared.checkpoints import checkpoint, read_checkpoint, save_checkpoint
from shared.db import create_engine, transaction
from shared.event_store import EventStore, LogPosition
from shared.jobs.messaging import RUN_JOB_TASK, celery_app
from shared.settings import Settings

log = logging.getLogger(__name__)

CHECKPOINT = "dispatcher"
DISPATCHED_TYPES = ("JobSubmitted", "JobRetryScheduled")
PREFETCH = 500
BATCH_SIZE = 200
IDLE_CATCH_UP_S = 5.0


def queue_name(settings: Settings) -> str:
    return f"{settings.events_exchange}.dispatcher"


class Dispatcher:
    def __init__(
        self, settings: Settings, engine: AsyncEngine, celery: Celery | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = EventStore(engine)
        self.celery = celery or celery_app(settings, name="helixnet-dispatcher")
        # Celery's publisher blocks; one thread keeps its connection to itself.
        self.sender = ThreadPoolExecutor(1, thread_name_prefix="dispatch")
        self.consuming = asyncio.Event()
        self.dispatched = 0
        # The checkpoint as this process last read or wrote it. Another process
        # can only have moved it further, so a stale value sends a task twice at
        # worst; it saves a read per batch on the way to the worker.
        self._position: LogPosition | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        backoff_s = 0.1
        try:
            while not stopping.is_set():
                try:
                    await self._consume(stopping)
                    backoff_s = 0.1
                except Exception:
                    log.exception("job dispatcher failed, reconnecting")
                    self.consuming.clear()
                    try:
                        await asyncio.wait_for(stopping.wait(), backoff_s)
                    except TimeoutError:
                        backoff_s = min(backoff_s * 2, 5.0)
        finally:
            self.sender.shutdown(wait=False, cancel_futures=True)

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        exchange = await declare_exchange(channel, self.settings.events_exchange)
        queue = await channel.declare_queue(
            queue_name(self.settings),
            durable=True,
            arguments={"x-single-active-consumer": True},
        )
        for event_type in DISPATCHED_TYPES:
            await queue.bind(exchange, f"job.{event_type}")
        return queue

    async def _consume(self, stopping: asyncio.Event) -> None:
        connection = await aio_pika.connect(self.settings.rabbitmq_url, timeout=5)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            queue = await self.declare(channel)
            # After declaring the queue: what the relay publishes from now on is
            # queued, and everything before it comes from the store.
            await self.catch_up()
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

            async def deliver(message: AbstractIncomingMessage) -> None:
                inbox.put_nowait(message)

            await queue.consume(deliver, no_ack=False)
            self.consuming.set()
            idle_s = 0.0
            while not stopping.is_set():
                raise_if_disconnected(connection)
                try:
                    first = await asyncio.wait_for(inbox.get(), 0.5)
                except TimeoutError:
                    idle_s += 0.5
                    if idle_s >= IDLE_CATCH_UP_S:
                        idle_s = 0.0
                        await self.catch_up()
                    continue
                idle_s = 0.0
                batch = [first]
                while len(batch) < BATCH_SIZE and not inbox.empty():
                    batch.append(inbox.get_nowait())
                await self.handle(batch)
                last = max(batch, key=lambda message: message.delivery_tag or 0)
                await last.ack(multiple=True)
        self.consuming.clear()

    async def handle(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Send the tasks of a batch of delivered events past the checkpoint."""
        current = self._position or await checkpoint(self.engine, CHECKPOINT)
        tasks: dict[LogPosition, dict[str, Any]] = {}
        for message in messages:
            try:
                envelope = json.loads(message.body)
                position = LogPosition(
                    int(envelope["transaction_id"]), int(envelope["position"])
                )
                if position > current and envelope["type"] in DISPATCHED_TYPES:
                    tasks[position] = _task_for(envelope)
            except (ValueError, KeyError, TypeError) as exc:
                # The log has it anyway; the next catch-up finds it.
                log.error(
                    "dropping a malformed message",
                    extra={"message_id": message.message_id, "error": str(exc)},
                )
        if tasks:
            await self._send([tasks[key] for key in sorted(tasks)])
            await self._save(max(tasks))

    async def catch_up(self) -> None:
        """Dispatch what the log holds after the checkpoint, up to its head."""
        position = await checkpoint(self.engine, CHECKPOINT)
        head = await self.store.head()
        while position < head:
            page = await self.store.read_all(
                position, limit=BATCH_SIZE, types=DISPATCHED_TYPES, until=head
            )
            if page:
                await self._send([_task_for(event.envelope()) for event in page])
            position = page[-1].log_position if len(page) == BATCH_SIZE else head
            await self._save(position)

    async def _save(self, position: LogPosition) -> None:
        async with transaction(self.engine) as connection:
            current = await checkpoint_in(connection)
            if position > current:
                await save_checkpoint(connection, CHECKPOINT, position)
            self._position = max(position, current)

    async def _send(self, tasks: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.sender, self._send_blocking, tasks)
        self.dispatched += len(tasks)

    def _send_blocking(self, tasks: list[dict[str, Any]]) -> None:
        with self.celery.producer_or_acquire() as producer:
            for task in tasks:
                self.celery.send_task(
                    RUN_JOB_TASK,
                    args=[task["job_id"]],
                    task_id=task["task_id"],
                    queue=self.settings.jobs_queue,
                    eta=task["eta"],
                    producer=producer,
                    retry=True,
                    retry_policy={"max_retries": 5, "interval_max": 1.0},
                )


async def checkpoint_in(connection: Any) -> LogPosition:
    """The dispatcher's checkpoint, locked until the transaction ends."""
    position = await read_checkpoint(connection, CHECKPOINT, for_update=True)
    return position or LogPosition(0, 0)


def _task_for(envelope: dict[str, Any]) -> dict[str, Any]:
    """The Celery task an event asks for: run its job, now or at the retry time."""
    eta = None
    if envelope["type"] == "JobRetryScheduled":
        eta = datetime.fromisoformat(envelope["data"]["retry_at"])
    return {
        "job_id": envelope["stream_id"].removeprefix("job-"),
        "task_id": envelope["event_id"],
        "eta": eta,
    }


async def run_dispatcher(settings: Settings, stopping: asyncio.Event) -> None:
    engine = create_engine(settings, pool_size=2)
    try:
        await Dispatcher(settings, engine).run(stopping)
    finally:
        await engine.dispose()
