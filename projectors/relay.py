"""The relay: publishes the event log, in log order, to RabbitMQ.

Each event goes to the durable topic exchange `settings.events_exchange` with the
routing key `<category>.<EventType>`, persistent, `message_id` = event id, the
body being the event's envelope. The header `previous` holds the log position of
the event before it ("<transaction_id>:<position>"), so a consumer can tell that it
missed something and read the gap from the store.

The relay's checkpoint moves only after the broker confirmed every message of a
batch: a crash in between publishes some events again (consumers drop duplicates),
never loses one. While RabbitMQ is down the events wait in the log and the relay
retries with backoff. One relay is active at a time: it holds a PostgreSQL advisory
lock on a connection of its own, and others wait for it.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence

import aio_pika
import aiormq
import psycopg
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    wait_exponential,
)

from shared.checkpoints import RELAY, checkpoint, save_checkpoint
from shared.db import connect_options, transaction
from shared.event_store import EventStore, LogPosition, RecordedEvent
from shared.log_listener import LogListener
from shared.settings import Settings

log = logging.getLogger(__name__)

PREVIOUS_HEADER = "previous"
RECHECK_S = 0.005
SAVE_EVERY_S = 0.5
SAVE_IDLE_S = 0.05
# Any fixed number will do: advisory locks are per database.
RELAY_LOCK_KEY = 0x48454C49585245  # "HELIXRE"
# What a lost or refusing broker connection raises.
BROKER_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
)


def routing_key(event: RecordedEvent) -> str:
    return f"{event.category}.{event.type}"


def format_position(position: LogPosition) -> str:
    return f"{position.transaction_id}:{position.position}"


def parse_position(text: str) -> LogPosition:
    transaction_id, position = text.split(":")
    return LogPosition(int(transaction_id), int(position))


def to_message(event: RecordedEvent, previous: LogPosition) -> aio_pika.Message:
    return aio_pika.Message(
        body=json.dumps(event.envelope()).encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(event.event_id),
        type=event.type,
        timestamp=event.recorded_at,
        headers={PREVIOUS_HEADER: format_position(previous)},
    )


async def declare_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    return await channel.declare_exchange(
        name, aio_pika.ExchangeType.TOPIC, durable=True
    )


def raise_if_disconnected(connection: AbstractConnection) -> None:
    """Raise if RabbitMQ dropped `connection`, so the consumer reconnects.

    A connection the broker closed is not `is_closed` (that means closed by us);
    it only stops being `connected`.
    """
    if connection.is_closed or not connection.connected.is_set():
        raise ConnectionError("RabbitMQ connection lost")


class Relay:
    """Tails the log from the "relay" checkpoint and publishes it with confirms."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        batch_size: int = 500,
        lock_poll_s: float = 1.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = EventStore(engine)
        self.batch_size = batch_size
        self.lock_poll_s = lock_poll_s
        self.max_backoff_s = max_backoff_s
        self.published = 0
        self.active = asyncio.Event()
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Wait for the relay lock, then publish until `stopping` is set."""
        while not stopping.is_set():
            try:
                async with self._relay_lock(stopping) as locked:
                    if locked is not None:
                        await self._publish_while_locked(locked, stopping)
            except Exception:
                # PostgreSQL went away (the lock with it) or something unexpected:
                # start over from the checkpoint, which nothing moved past.
                log.exception("relay stopped publishing, starting over")
                await _sleep_unless(stopping, self.lock_poll_s)
            finally:
                self.active.clear()
        await self._close_broker()

    @contextlib.asynccontextmanager
    async def _relay_lock(self, stopping: asyncio.Event):  # type: ignore[no-untyped-def]
        """Yield the connection holding the relay lock (None if stopping first).

        The lock is a session lock on a connection of its own: it stays held for
        as long as that connection lives, and goes away with it if the process dies.
        """
        connection = await psycopg.AsyncConnection.connect(
            self.settings.psycopg_dsn, autocommit=True, **connect_options(5)
        )
        async with connection:
            while not stopping.is_set():
                cursor = await connection.execute(
                    "SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK_KEY,)
                )
                row = await cursor.fetchone()
                if row and row[0]:
                    log.info("relay is active")
                    yield connection
                    return
                await _sleep_unless(stopping, self.lock_poll_s)
            yield None

    async def _publish_while_locked(
        self, lock: psycopg.AsyncConnection, stopping: asyncio.Event
    ) -> None:
        self.active.set()
        async with transaction(self.engine) as connection:
            await connection.exec_driver_sql(
                "INSERT INTO checkpoints (name) VALUES (%s) ON CONFLICT DO NOTHING",
                (RELAY,),
            )
        position = saved = await checkpoint(self.engine, RELAY)
        saved_at = published_at = time.monotonic()
        poll_s = self.settings.tail_poll_interval_s
        recheck_s = poll_s
        listener = LogListener(self.settings.psycopg_dsn)
        await listener.start()
        try:
            while not stopping.is_set():
                # Read on the lock's session: a broken one (another relay may be
                # active now) fails the read, and the pool is not needed.
                events = await self.store.read_all(
                    position, limit=self.batch_size, connection=lock
                )
                if not events:
                    # Saved once idle a moment, not each time the log runs dry:
                    # under a steady trickle that would be a commit per batch.
                    idle_s = time.monotonic() - published_at
                    if position != saved and idle_s >= SAVE_IDLE_S:
                        await self._save(position)
                        saved, saved_at = position, time.monotonic()
                    # A commit may still sit above the read horizon when its
                    # notification arrives: look again soon, then less often.
                    if await listener.wait(recheck_s):
                        recheck_s = RECHECK_S
                    else:
                        recheck_s = min(recheck_s * 2, poll_s)
                    continue
                recheck_s = RECHECK_S
                if not await self._publish_with_retries(events, position, stopping):
                    return
                position = events[-1].log_position
                published_at = time.monotonic()
                # Saved when idle or every so often, not per batch: a crash in
                # between only publishes some events again, which consumers skip.
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    await self._save(position)
                    saved, saved_at = position, time.monotonic()
        finally:
            await listener.stop()
            if position != saved:
                with contextlib.suppress(Exception):
                    await self._save(position)

    async def _save(self, position: LogPosition) -> None:
        async with transaction(self.engine) as connection:
            await save_checkpoint(connection, RELAY, position)

    async def _publish_with_retries(
        self,
        events: Sequence[RecordedEvent],
        previous: LogPosition,
        stopping: asyncio.Event,
    ) -> bool:
        """Publish `events` until the broker confirms all; False if stopping first."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(BROKER_ERRORS),
            wait=wait_exponential(multiplier=0.1, max=self.max_backoff_s),
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if stopping.is_set():
                    return False
                await self._publish(events, previous)
        return True

    async def _publish(
        self, events: Sequence[RecordedEvent], previous: LogPosition
    ) -> None:
        try:
            exchange = await self._broker()
            publishes = []
            for event in events:
                publishes.append(
                    exchange.publish(
                        to_message(event, previous),
                        routing_key(event),
                        mandatory=False,
                        timeout=30,
                    )
                )
                previous = event.log_position
            # aio-pika sends in call order under the channel's lock; the confirms
            # come back whenever the broker has persisted them.
            await asyncio.gather(*publishes)
        except BaseException:
            await self._close_broker()
            raise
        self.published += len(events)

    async def _broker(self) -> AbstractExchange:
        if self._exchange is None or self._connection is None:
            self._connection = await aio_pika.connect(
                self.settings.rabbitmq_url, timeout=5
            )
            channel = await self._connection.channel(publisher_confirms=True)
            self._exchange = await declare_exchange(
                channel, self.settings.events_exchange
            )
        return self._exchange

    async def _close_broker(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    @staticmethod
    def _log_retry(retry_state) -> None:  # type: ignore[no-untyped-def]
        error = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning(
            "publishing to RabbitMQ failed, retrying",
            extra={"attempt": retry_state.attempt_number, "error": repr(error)},
        )


async def _sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
