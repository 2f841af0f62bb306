"""A projection fed from RabbitMQ, with the event store as the source of truth.

Each projection has its own durable queue, `<events_exchange>.<projection>`, bound
to the routing keys of the event types it handles, with a single active consumer
(standby processes take over when it goes) and a prefetch. Messages are applied in
batches and acknowledged after the batch committed, so a crash leaves them to be
delivered again, and the checkpoint makes the second delivery a no-op.

A message carries the log position of the event before it. When a batch does not
follow on from the checkpoint (a message lost, acknowledged without being applied,
or for a type this projection does not handle), the projector reads what it missed
from the store instead. It also catches up from the store when it starts and when
it has been idle a while, and while RabbitMQ is unreachable, so it does not
depend on the broker to be complete, nor to be up.
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.batches import consume_in_batches, every
from projectors.framework import (
    Projection,
    apply_in_transaction,
    catch_up,
    checkpoint_name,
)
from projectors.relay import (
    PREVIOUS_HEADER,
    declare_exchange,
    parse_position,
)
from shared.checkpoints import read_checkpoint
from shared.db import transaction
from shared.errors import UnknownEventType
from shared.event_store import EventStore, LogPosition, RecordedEvent
from shared.events import registry as default_registry
from shared.events.registry import EventRegistry
from shared.settings import Settings

log = logging.getLogger(__name__)


def queue_name(settings: Settings, projection: Projection) -> str:
    return f"{settings.events_exchange}.{projection.name}"


def from_envelope(envelope: dict[str, Any], events: EventRegistry) -> RecordedEvent:
    """The event a relay message carries, upcast like the store would."""
    data, schema_version = envelope["data"], envelope["schema_version"]
    try:
        event_type = events.get(envelope["type"])
    except UnknownEventType:
        event_type = None
    if event_type is not None and schema_version < event_type.version:
        data = event_type.upcast(data, schema_version)
        schema_version = event_type.version
    return RecordedEvent(
        position=envelope["position"],
        transaction_id=envelope["transaction_id"],
        stream_id=envelope["stream_id"],
        category=envelope["category"],
        version=envelope["version"],
        event_id=UUID(envelope["event_id"]),
        type=envelope["type"],
        schema_version=schema_version,
        data=data,
        metadata=envelope["metadata"],
        recorded_at=datetime.fromisoformat(envelope["recorded_at"]),
    )


class ProjectionConsumer:
    """Keeps one projection's live tables up to date; reconnects on its own."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        projection: Projection,
        *,
        events: EventRegistry = default_registry,
        prefetch: int = 1000,
        batch_size: int = 500,
        idle_catch_up_s: float | None = 2.0,
        catch_up_on_start: bool = True,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.projection = projection
        self.events = events
        self.store = EventStore(engine, events)
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.idle_catch_up_s = idle_catch_up_s
        self.catch_up_on_start = catch_up_on_start
        self.queue_name = queue_name(settings, projection)
        self.consuming = asyncio.Event()
        self.filled_from_store = 0

    async def run(self, stopping: asyncio.Event) -> None:
        backoff_s = 0.1
        while not stopping.is_set():
            try:
                await self._consume(stopping)
                backoff_s = 0.1
            except Exception:
                log.exception(
                    "projection consumer failed, reconnecting",
                    extra={"projection": self.projection.name},
                )
                self.consuming.clear()
                # While the broker is away, keep the tables moving from the store.
                with contextlib.suppress(Exception):
                    await catch_up(self.engine, self.projection, store=self.store)
                try:
                    await asyncio.wait_for(stopping.wait(), backoff_s)
                except TimeoutError:
                    backoff_s = min(backoff_s * 2, 5.0)

    async def declare(self, channel: aio_pika.abc.AbstractChannel) -> AbstractQueue:
        exchange = await declare_exchange(channel, self.settings.events_exchange)
        queue = await channel.declare_queue(
            self.queue_name,
            durable=True,
            arguments={"x-single-active-consumer": True},
        )
        for event_type in self.projection.event_types:
            await queue.bind(exchange, f"*.{event_type}")
        return queue

    async def _consume(self, stopping: asyncio.Event) -> None:
        connection = await aio_pika.connect(self.settings.rabbitmq_url, timeout=5)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await self.declare(channel)
            if self.catch_up_on_start:
                # After declaring the queue: whatever the relay publishes from now
                # on is queued, and everything before it comes from the store.
                await catch_up(self.engine, self.projection, store=self.store)
            await consume_in_batches(
                connection,
                queue,
                stopping,
                batch_size=self.batch_size,
                handle=self.handle,
                idle=self._idle,
                consuming=self.consuming,
            )
        self.consuming.clear()

    async def _idle(self, idle_ticks: int) -> None:
        # Every idle_catch_up_s of quiet, make good anything the broker missed.
        if self.idle_catch_up_s is not None and every(self.idle_catch_up_s, idle_ticks):
            await catch_up(self.engine, self.projection, store=self.store)

    async def handle(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Apply a batch of delivered events, reading any gap from the store."""
        received: dict[LogPosition, tuple[RecordedEvent, LogPosition]] = {}
        for message in messages:
            try:
                event = from_envelope(json.loads(message.body), self.events)
                previous_header = (message.headers or {}).get(PREVIOUS_HEADER)
                previous = parse_position(str(previous_header))
            except (ValueError, KeyError, TypeError) as exc:
                # The store has it anyway: the next batch finds the gap.
                log.error(
                    "dropping a malformed message",
                    extra={"message_id": message.message_id, "error": str(exc)},
                )
                continue
            received[event.log_position] = (event, previous)
        if not received:
            return

        # One transaction from the checkpoint read to the commit: the checkpoint is
        # locked, so the batch is judged against the value it is applied on, and
        # the common case costs one connection and no separate read.
        async with transaction(self.engine) as connection:
            name = checkpoint_name(self.projection)
            locked = await read_checkpoint(connection, name, for_update=True)
            if locked is None:
                raise LookupError(f"no checkpoint {name}; run ensure_created first")
            current = locked
            fresh = [received[key] for key in sorted(received) if key > current]
            if not fresh:
                return
            expected = current
            contiguous = True
            for event, follows in fresh:
                contiguous = contiguous and follows == expected
                expected = event.log_position
            if contiguous:
                events = [e for e, _ in fresh]
                await apply_in_transaction(
                    connection, self.projection, events, locked=locked
                )
                return
        self.filled_from_store += 1
        await catch_up(
            self.engine,
            self.projection,
            store=self.store,
            until=fresh[-1][0].log_position,
        )
