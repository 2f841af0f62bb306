"""No reader skips an event: many concurrent writers against a tailing reader.

Writers hold their transactions open for a random moment after appending, so
positions commit out of order. A reader that went by position alone would skip
the late committers; the store's reader must see every event exactly once, in the
order of the final table.
"""

import asyncio
import random
import time
import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import connect, transaction
from shared.event_store import LOG_START, EventMetadata, EventStore
from tests.sample_events import ThingHappened, sample_events

WRITERS = 8
APPENDS_PER_WRITER = 110
ROUNDS = 3
META = EventMetadata(source="tests")


async def write(store: EventStore, engine: AsyncEngine, rng: random.Random) -> int:
    stream = f"thing-{uuid.uuid4()}"
    written = 0
    for version in range(APPENDS_PER_WRITER):
        count = rng.randint(1, 8)
        async with transaction(engine) as connection:
            await store.append(
                stream,
                [ThingHappened(name=f"{version}.{i}") for i in range(count)],
                expected_version=written,
                metadata=META,
                connection=connection,
            )
            await asyncio.sleep(rng.uniform(0, 0.003))
        written += count
    return written


async def tail(
    store: EventStore, written: asyncio.Future[int], rng: random.Random
) -> list[int]:
    """Read until the log holds as many events as were written, or give up."""
    seen: list[int] = []
    after = LOG_START
    deadline = None
    while True:
        batch = await store.read_all(after, limit=rng.randint(20, 400))
        seen.extend(event.position for event in batch)
        if batch:
            after = batch[-1].log_position
            continue
        if written.done():
            # Any open transaction in the cluster holds the horizon back for a
            # moment, so an empty read does not yet mean the reader has caught up.
            deadline = deadline or time.monotonic() + 60
            if len(seen) >= written.result() or time.monotonic() > deadline:
                return seen
        await asyncio.sleep(0.001)


async def tail_by_position_alone(engine: AsyncEngine, done: asyncio.Event) -> set[int]:
    """The naive reader the design rules out, to show the race really happens."""
    seen: set[int] = set()
    last = 0
    while True:
        finished = done.is_set()
        async with connect(engine) as connection:
            result = await connection.exec_driver_sql(
                "SELECT position FROM events WHERE position > %s ORDER BY position",
                (last,),
            )
            positions = list(result.scalars())
        seen.update(positions)
        last = positions[-1] if positions else last
        if finished:
            return seen
        await asyncio.sleep(0.001)


async def test_tailing_reader_sees_every_committed_event_once_in_log_order(engine):
    store = EventStore(engine, sample_events)
    rng = random.Random(20261203)
    naive_misses = 0
    total = 0

    for _ in range(ROUNDS):
        done = asyncio.Event()
        log_size: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(tail(store, log_size, random.Random(rng.random())))
        naive = asyncio.create_task(tail_by_position_alone(engine, done))
        written = await asyncio.gather(
            *(write(store, engine, random.Random(rng.random())) for _ in range(WRITERS))
        )
        total += sum(written)
        done.set()
        log_size.set_result(total)
        seen, naive_seen = await reader, await naive

        async with connect(engine) as connection:
            result = await connection.exec_driver_sql(
                "SELECT position FROM events ORDER BY transaction_id, position"
            )
            final = list(result.scalars())

        assert len(final) == total
        assert len(seen) == len(set(seen)), "an event was read twice"
        assert seen == final, "the reader skipped or reordered events"
        naive_misses += len(set(final) - naive_seen)

    assert total >= 4000
    # Had the writers not raced, this test would prove nothing.
    assert naive_misses > 0, "commits never landed out of position order"
