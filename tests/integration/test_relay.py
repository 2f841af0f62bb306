"""The relay publishes the log to RabbitMQ, in order, with confirms, one at a time."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.relay import Relay, parse_position
from shared.checkpoints import RELAY, checkpoint
from shared.event_store import (
    NO_STREAM,
    EventMetadata,
    EventStore,
    LogPosition,
    RecordedEvent,
)
from shared.settings import Settings
from tests.broker import drain, rabbitmq_stopped, recording_queue
from tests.sample_events import ThingHappened, ThingRenamed, sample_events

META = EventMetadata(source="tests")


@pytest.fixture
def things(engine: AsyncEngine) -> EventStore:
    return EventStore(engine, sample_events)


async def append_things(store: EventStore, count: int) -> None:
    for index in range(count):
        stream = f"thing-{uuid.uuid4()}"
        await store.append(
            stream,
            [
                ThingHappened(name=f"t{index}", size=index),
                ThingRenamed(old_name=f"t{index}", new_name=f"r{index}"),
            ],
            expected_version=NO_STREAM,
            metadata=META,
        )


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[asyncio.Event]:
    stopping = asyncio.Event()
    task = asyncio.create_task(relay.run(stopping))
    try:
        yield stopping
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)


async def wait_for_checkpoint(engine: AsyncEngine, target: LogPosition) -> None:
    async with asyncio.timeout(60):
        while True:
            if await checkpoint(engine, RELAY) >= target:
                return
            await asyncio.sleep(0.05)


async def readable(store: EventStore, count: int) -> list[RecordedEvent]:
    """The log once `count` events are below the (cluster-wide) read horizon."""
    async with asyncio.timeout(30):
        while True:
            log = await store.read_all(limit=count)
            if len(log) >= count:
                return log
            await asyncio.sleep(0.01)


async def test_every_event_is_published_once_in_log_order(settings, engine, things):
    async with recording_queue(settings):
        await append_things(things, 20)
        relay = Relay(settings, engine, batch_size=7)
        async with running(relay):
            received = await drain(settings, 40)
        log = await readable(things, 40)

    envelopes = [envelope for envelope, _ in received]
    assert [e["event_id"] for e in envelopes] == [str(e.event_id) for e in log]
    assert relay.published == 40
    first, message = received[0]
    assert message.routing_key == "thing.ThingHappened"
    assert message.message_id == first["event_id"]
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert first["data"] == {"name": "t0", "size": 0}
    chain = [parse_position(m.headers["previous"]) for _, m in received]
    assert chain == [LogPosition(0, 0), *(e.log_position for e in log[:-1])]
    assert await checkpoint(engine, RELAY) == log[-1].log_position


async def test_events_appended_while_rabbitmq_is_down_all_arrive(
    settings, engine, things
):
    async with recording_queue(settings):
        relay = Relay(settings, engine, batch_size=5, max_backoff_s=0.5)
        async with running(relay):
            await append_things(things, 5)
            await wait_for_checkpoint(
                engine, (await readable(things, 10))[-1].log_position
            )
            with rabbitmq_stopped():
                await append_things(things, 10)
                await asyncio.sleep(1)
                stuck = await checkpoint(engine, RELAY)
            log = await readable(things, 30)
            await wait_for_checkpoint(engine, log[-1].log_position)
        received = await drain(settings, 30)

    assert stuck == log[9].log_position
    assert {e["event_id"] for e, _ in received} == {str(e.event_id) for e in log}


async def test_of_two_relays_started_together_only_one_publishes(
    settings: Settings, engine, things
):
    async with recording_queue(settings):
        await append_things(things, 10)
        relays = [Relay(settings, engine), Relay(settings, engine)]
        async with running(relays[0]), running(relays[1]):
            received = await drain(settings, 20)
            await append_things(things, 5)
            received += await drain(settings, 10)
            publishing = [relay.published for relay in relays]
            active = [relay.active.is_set() for relay in relays]

    assert sorted(publishing) == [0, 30]
    assert sorted(active) == [False, True]
    assert len({e["event_id"] for e, _ in received}) == 30


async def test_a_standby_relay_takes_over_when_the_active_one_stops(
    settings, engine, things
):
    async with recording_queue(settings):
        first, second = Relay(settings, engine), Relay(settings, engine)
        first_stopping = asyncio.Event()
        first_running = asyncio.create_task(first.run(first_stopping))
        await asyncio.wait_for(first.active.wait(), 10)
        async with running(second):
            await append_things(things, 3)
            await drain(settings, 6)
            first_stopping.set()
            await asyncio.wait_for(first_running, 30)
            await append_things(things, 3)
            received = await drain(settings, 6)

    assert first.published == 6
    assert second.published == 6
    assert len(received) == 6
