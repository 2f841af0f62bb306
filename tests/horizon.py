"""Waiting for the log's read horizon in tests."""

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.framework import Projection, catch_up
from shared.event_store import EventStore


async def wait_until_readable(store: EventStore, position: int) -> None:
    """Wait for the read horizon to pass `position`.

    Readers stop at the oldest transaction open anywhere in the cluster, and
    other tests run against the same server, so this can take a moment.
    """
    target = await store.locate(position)
    assert target is not None
    for _ in range(600):
        if await store.head() >= target:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"position {position} never became readable")


async def project_everything(engine: AsyncEngine, projection: Projection) -> None:
    """Apply every event appended so far to `projection`, once readable."""
    store = EventStore(engine)
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql("SELECT max(position) FROM events")
        last = result.scalar_one()
    await wait_until_readable(store, last)
    target = await store.locate(last)
    assert target is not None
    assert await catch_up(engine, projection, store=store, until=target) >= target
