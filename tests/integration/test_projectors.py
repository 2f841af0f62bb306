"""Projections: generations behind views, batches with checkpoints, consumers."""

import asyncio
import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.framework import (
    apply_batch,
    catch_up,
    ensure_created,
)
from projectors.projections import discover
from shared.checkpoints import checkpoint
from shared.db import connect
from shared.event_store import NO_STREAM, EventMetadata, EventStore, LogPosition
from tests.sample_events import ThingHappened, ThingRenamed, sample_events
from tests.sample_projection import make_projection

META = EventMetadata(source="tests")


async def append_things(store: EventStore, count: int) -> list[str]:
    streams = []
    for index in range(count):
        stream = f"thing-{uuid.uuid4()}"
        await store.append(
            stream,
            [ThingHappened(name=f"t{index}", size=index)],
            expected_version=NO_STREAM,
            metadata=META,
        )
        streams.append(stream)
    return streams


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
