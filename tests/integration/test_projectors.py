"""Projections: generations behind views, batches with checkpoints, consumers."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors import rebuild as rebuild_module
from projectors.consumer import ProjectionConsumer
from projectors.framework import (
    ProjectionTx,
    apply_batch,
    catch_up,
    checkpoint_name,
    ensure_created,
)
from projectors.projections import discover
from projectors.rebuild import rebuild, verify
from projectors.relay import Relay
from shared.checkpoints import checkpoint
from shared.db import connect, transaction
from shared.errors import Conflict
from shared.event_store import (
    EventMetadata,
    EventStore,
    LogPosition,
    RecordedEvent,
)
from shared.settings import Settings
from tests.broker import delete_broker_objects, rabbitmq_stopped
from tests.sample_events import ThingRenamed, sample_events
from tests.sample_projection import (
    append_things,
    make_projection,
    make_sql_projection,
)

META = EventMetadata(source="tests")


async def settled(store: EventStore) -> LogPosition:
    """The head once every event appended so far is readable.

    The read horizon is cluster-wide: a transaction open in another database holds
    it back for a moment, so the head can trail the last commit.
    """
    async with connect(store.engine) as connection:
        last = (
            await connection.exec_driver_sql("SELECT max(position) FROM events")
        ).scalar_one()
    target = await store.locate(last)
    assert target is not None
    while True:
        head = await store.head()
        if head >= target:
            return head
        await asyncio.sleep(0.01)


async def rows(engine: AsyncEngine, sql: str) -> list[tuple]:
    async with connect(engine) as connection:
        return [tuple(row) for row in (await connection.exec_driver_sql(sql)).all()]


async def test_ensure_created_makes_generation_one_behind_a_view_and_is_idempotent(
    engine,
):
    projection = make_projection()

    assert await ensure_created(engine, [projection]) == []
    assert await ensure_created(engine, [projection]) == []

    views = await rows(
        engine,
        "SELECT definition FROM pg_views WHERE viewname = 'things'",
    )
    assert len(views) == 1 and "things_g1" in views[0][0]
    state = await rows(
        engine, "SELECT live_generation, event_types FROM projection_state"
    )
    assert state == [(1, ["ThingHappened", "ThingRenamed"])]


async def test_changed_table_definition_is_reported_stale(engine):
    await ensure_created(engine, [make_projection()])
    changed = make_projection()
    changed.tables["things"] += ", colour text"

    assert await ensure_created(engine, [changed]) == [changed]


async def test_catch_up_applies_each_event_once_and_moves_the_checkpoint(engine):
    projection = make_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    streams = await append_things(store, 5)
    await store.append(
        streams[0],
        [ThingRenamed(old_name="t0", new_name="renamed")],
        expected_version=1,
        metadata=META,
    )

    head = await settled(store)

    position = await catch_up(engine, projection, store=store)
    again = await catch_up(engine, projection, store=store)

    assert position == again == head
    assert await checkpoint(engine, "things") == position
    things = await rows(
        engine, "SELECT stream_id, name, applied FROM things ORDER BY size"
    )
    assert things[0] == (streams[0], "renamed", 2)
    assert [row[2] for row in things[1:]] == [1, 1, 1, 1]


async def test_a_batch_at_or_below_the_checkpoint_is_skipped(engine):
    projection = make_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    await append_things(store, 3)
    await settled(store)
    events = await store.read_all()

    await apply_batch(engine, projection, events[:2])
    await apply_batch(engine, projection, events)
    await apply_batch(engine, projection, events[1:])

    assert await rows(engine, "SELECT applied FROM things ORDER BY size") == [
        (1,),
        (1,),
        (1,),
    ]


def test_discover_finds_projection_modules_by_name():
    projections = discover()

    assert [p.name for p in projections] == sorted(p.name for p in projections)
    assert all(p.event_types for p in projections)


@contextlib.asynccontextmanager
async def running(*components: Any) -> AsyncIterator[asyncio.Event]:
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(component.run(stopping)) for component in components]
    try:
        yield stopping
    finally:
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def projected(
    engine: AsyncEngine, store: EventStore, name: str, *, timeout_s: float = 60
) -> LogPosition:
    """Wait until projection `name` has processed every event appended so far."""
    target = await settled(store)
    async with asyncio.timeout(timeout_s):
        while True:
            position = await checkpoint(engine, name)
            if position >= target:
                return position
            await asyncio.sleep(0.02)


async def wait_for_messages(queue: Any, count: int) -> None:
    async with asyncio.timeout(30):
        while True:
            if (await queue.declare()).message_count >= count:
                return
            await asyncio.sleep(0.02)


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[None]:
    yield
    await delete_broker_objects(settings, f"{settings.events_exchange}.things")


def consumer(settings, engine, projection, **options: Any) -> ProjectionConsumer:
    return ProjectionConsumer(
        settings, engine, projection, events=sample_events, **options
    )


async def test_relayed_events_are_projected_once_each(settings, engine, broker):
    projection = make_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    streams = await append_things(store, 10)
    things = consumer(settings, engine, projection)

    async with running(Relay(settings, engine), things):
        await asyncio.wait_for(things.consuming.wait(), 30)
        streams += await append_things(store, 10)
        await store.append(
            streams[-1],
            [ThingRenamed(old_name="t9", new_name="last")],
            expected_version=1,
            metadata=META,
        )
        await projected(engine, store, "things")

    assert await rows(engine, "SELECT count(*), sum(applied) FROM things") == [(20, 21)]
    assert await rows(
        engine, f"SELECT name FROM things WHERE stream_id = '{streams[-1]}'"
    ) == [("last",)]


async def test_a_projector_killed_mid_batch_resumes_without_applying_twice(
    settings, engine, broker
):
    projection = make_projection()
    gate, reached = asyncio.Event(), asyncio.Event()

    @projection.handles("ThingNoted")
    async def wait_at_the_gate(tx: ProjectionTx, event: RecordedEvent) -> None:
        reached.set()
        await gate.wait()

    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    first = consumer(settings, engine, projection, catch_up_on_start=False)
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        queue = await first.declare(await connection.channel())
        await append_things(store, 30, noted_at=15)
        async with running(Relay(settings, engine)):
            await settled(store)
            await wait_for_messages(queue, 31)
    killed = asyncio.create_task(first.run(asyncio.Event()))
    await asyncio.wait_for(reached.wait(), 30)
    killed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await killed
    gate.set()
    async with running(consumer(settings, engine, projection)):
        await projected(engine, store, "things")

    assert await rows(engine, "SELECT count(*), max(applied) FROM things") == [(30, 1)]


async def test_a_message_acked_without_being_applied_is_made_good_by_the_next(
    settings, engine, broker
):
    projection = make_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    things = consumer(
        settings, engine, projection, catch_up_on_start=False, idle_catch_up_s=None
    )
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        queue = await things.declare(await connection.channel())
        await append_things(store, 6)
        async with running(Relay(settings, engine)):
            await settled(store)
            await wait_for_messages(queue, 6)
        lost = await queue.get()
        await lost.ack()
    assert lost is not None

    async with running(things):
        await projected(engine, store, "things")

    assert things.filled_from_store == 1
    assert await rows(engine, "SELECT count(*), max(applied) FROM things") == [(6, 1)]


async def test_a_rebuilt_projection_equals_the_live_one_and_replaces_it(engine):
    projection = make_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    streams = await append_things(store, 50)
    await store.append(
        streams[3],
        [ThingRenamed(old_name="t3", new_name="renamed")],
        expected_version=1,
        metadata=META,
    )
    await settled(store)
    await catch_up(engine, projection, store=store)
    before = await rows(engine, "SELECT * FROM things ORDER BY stream_id")
    seen: list[tuple[int, int]] = []

    result = await rebuild(
        engine,
        projection,
        store=store,
        batch_size=7,
        progress=lambda *p: seen.append(p),
    )

    assert result.generation == 2
    assert result.events == 51
    assert seen[-1] == (51, 51)
    assert await rows(engine, "SELECT * FROM things ORDER BY stream_id") == before
    assert await rows(engine, "SELECT to_regclass('things_g1') IS NULL") == [(True,)]
    assert await checkpoint(engine, "things") == result.checkpoint
    assert await verify(engine, projection, store=store) == []


async def test_an_interrupted_rebuild_resumes_where_it_stopped(engine):
    projection = make_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    await append_things(store, 30)
    await settled(store)
    await catch_up(engine, projection, store=store)

    def interrupt(done: int, total: int) -> None:
        if done >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await rebuild(engine, projection, store=store, batch_size=5, progress=interrupt)
    resumed: list[tuple[int, int]] = []
    result = await rebuild(
        engine,
        projection,
        store=store,
        batch_size=5,
        progress=lambda *p: resumed.append(p),
    )

    assert resumed[0] == (5, 20)
    assert result.generation == 2
    assert await rows(engine, "SELECT count(*), max(applied) FROM things") == [(30, 1)]


async def test_verify_catches_a_tampered_read_row(engine):
    projection = make_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    streams = await append_things(store, 5)
    await settled(store)
    await catch_up(engine, projection, store=store)
    async with transaction(engine) as connection:
        await connection.exec_driver_sql(
            "UPDATE things_g1 SET size = 999 WHERE stream_id = %s", (streams[2],)
        )

    differences = await verify(engine, projection, store=store)

    assert [d.table for d in differences] == ["things"]
    assert [row["size"] for row in differences[0].only_live] == [999]
    assert [row["size"] for row in differences[0].only_rebuilt] == [2]
    assert await rows(
        engine, "SELECT count(*) FROM pg_tables WHERE tablename LIKE '%%verify%%'"
    ) == [(0,)]


async def test_a_set_based_projection_rebuilds_to_the_rows_it_built_live(engine):
    projection = make_sql_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    streams = await append_things(store, 40)
    for stream in streams[5:8]:
        await store.append(
            stream,
            [ThingRenamed(old_name="x", new_name=f"renamed {stream}")],
            expected_version=1,
            metadata=META,
        )
    await append_things(store, 10)
    await settled(store)
    await catch_up(engine, projection, store=store, batch_size=9)
    live = await rows(engine, "SELECT * FROM things ORDER BY stream_id")

    result = await rebuild(engine, projection, store=store, batch_size=6)

    assert projection.set_based
    assert result.events == 53
    assert await rows(engine, "SELECT * FROM things ORDER BY stream_id") == live
    assert await rows(engine, "SELECT count(*), max(applied) FROM things") == [(50, 2)]
    assert await verify(engine, projection, store=store, batch_size=4) == []


async def test_a_rebuild_that_lost_the_race_does_not_replay_into_the_live_table(
    engine,
):
    projection = make_sql_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    await append_things(store, 12)
    await settled(store)
    # The loser started building the generation first; the winner resumed it,
    # filled it and swapped it in.
    generation = await rebuild_module._start_generation(engine, projection)
    await rebuild(engine, projection, store=store, batch_size=5)

    with pytest.raises(Conflict, match="took over"):
        await rebuild_module._fill(
            engine,
            store,
            projection,
            generation=generation,
            tables=None,
            checkpoint=checkpoint_name(projection, generation),
            until=None,
            progress=None,
            done=0,
            total=0,
            batch_size=5,
        )

    assert await rows(engine, "SELECT count(*), max(applied) FROM things") == [(12, 1)]


async def test_events_appended_while_rabbitmq_is_down_are_projected_once_each(
    settings, engine, broker
):
    projection = make_projection()
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [projection])
    things = consumer(settings, engine, projection, idle_catch_up_s=None)
    relay = Relay(settings, engine, max_backoff_s=0.5)
    async with running(relay, things):
        await asyncio.wait_for(things.consuming.wait(), 30)
        await append_things(store, 5)
        await projected(engine, store, "things")
        with rabbitmq_stopped():
            await append_things(store, 10)
            # From the store: the consumer falls back to it while the broker is down.
            await projected(engine, store, "things", timeout_s=15)
        await append_things(store, 5)
        await projected(engine, store, "things")

    assert await rows(engine, "SELECT count(*), max(applied) FROM things") == [(20, 1)]
