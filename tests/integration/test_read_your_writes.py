"""A GET with Helix-Position waits for the projections it reads, within a bound."""

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest
from fastapi import Depends, FastAPI

from projectors.framework import (
    Projection,
    ProjectionTx,
    catch_up,
    ensure_created,
    retire,
)
from query_api.consistency import consistent_read
from shared.checkpoints import RELAY, lag_check, lags, save_checkpoint
from shared.db import connect, transaction
from shared.event_store import NO_STREAM, EventMetadata, EventStore, RecordedEvent
from shared.jobs.messaging import DISPATCHER
from shared.settings import Settings
from tests.horizon import wait_until_readable
from tests.sample_events import ThingHappened, sample_events
from tests.sample_projection import ThingNoted, make_projection

META = EventMetadata(source="tests")


@pytest.fixture
async def client(settings: Settings, engine) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.state.engine = engine
    app.state.settings = settings.model_copy(update={"read_your_writes_timeout_s": 0.5})

    @app.get("/things/count", dependencies=[Depends(consistent_read("things"))])
    async def count_things() -> int:
        async with connect(engine) as connection:
            result = await connection.exec_driver_sql("SELECT count(*) FROM things")
            return int(result.scalar_one())

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


@pytest.fixture
async def things(engine) -> EventStore:
    await ensure_created(engine, [make_projection()])
    return EventStore(engine, sample_events)


async def add_thing(store: EventStore) -> int:
    result = await store.append(
        f"thing-{uuid.uuid4()}",
        [ThingHappened(name="x")],
        expected_version=NO_STREAM,
        metadata=META,
    )
    return result.last_position


async def project(engine, store: EventStore, position: int) -> None:
    """Project up to `position`, waiting for the read horizon to pass it."""
    target = await store.locate(position)
    assert target is not None
    while True:
        if (
            await catch_up(engine, make_projection(), store=store, until=target)
            >= target
        ):
            return
        await asyncio.sleep(0.01)


async def test_a_read_without_the_header_answers_at_once(client, things):
    await add_thing(things)

    response = await client.get("/things/count")

    assert response.status_code == 200
    assert response.json() == 0


async def test_a_read_waits_until_the_projection_has_the_position(
    client, engine, things
):
    position = await add_thing(things)

    async def project_soon() -> None:
        await asyncio.sleep(0.1)
        await project(engine, things, position)

    projecting = asyncio.create_task(project_soon())
    response = await client.get(
        "/things/count", headers={"Helix-Position": str(position)}
    )
    await projecting

    assert response.status_code == 200
    assert response.json() == 1


async def test_a_read_past_the_bound_is_answered_503_with_retry_after(client, things):
    position = await add_thing(things)

    response = await client.get(
        "/things/count", headers={"Helix-Position": str(position)}
    )

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "caught up" in response.json()["detail"]


async def test_a_position_of_an_event_the_projection_ignores_does_not_wait(
    client, engine, things
):
    position = await add_thing(things)
    await project(engine, things, position)
    noted = await things.append(
        f"note-{uuid.uuid4()}",
        [ThingNoted(note="not for things")],
        expected_version=NO_STREAM,
        metadata=META,
    )

    response = await client.get(
        "/things/count", headers={"Helix-Position": str(noted.last_position)}
    )

    assert response.status_code == 200


@pytest.mark.parametrize("value", ["abc", "-3", "0", "1.5", "9" * 30])
async def test_a_malformed_position_is_refused(client, things, value):
    response = await client.get("/things/count", headers={"Helix-Position": value})

    assert response.status_code == 422


async def test_lag_counts_only_the_events_a_projection_handles(engine, things):
    first = await add_thing(things)
    await project(engine, things, first)
    await add_thing(things)
    await things.append(
        f"note-{uuid.uuid4()}",
        [ThingNoted(note="ignored")],
        expected_version=NO_STREAM,
        metadata=META,
    )
    async with asyncio.timeout(30):
        while True:
            if len(await things.read_all()) == 3:
                break
            await asyncio.sleep(0.01)

    (lag,) = await lags(engine, ["things"])

    assert lag.events == 1
    assert lag.seconds >= 0


async def mark_caught_up(engine, store: EventStore, *names: str) -> None:
    head = await store.head()
    async with transaction(engine) as connection:
        for name in names:
            await save_checkpoint(connection, name, head)


async def test_lag_check_fails_naming_a_projection_that_is_behind(engine, things):
    check = lag_check(engine, max_lag_s=0.0)
    await project(engine, things, await add_thing(things))
    # As if the relay and the dispatcher had run.
    await mark_caught_up(engine, things, RELAY, DISPATCHER)
    await check()
    await add_thing(things)
    async with asyncio.timeout(30):
        while True:
            if len(await things.read_all()) == 2:
                break
            await asyncio.sleep(0.01)

    with pytest.raises(RuntimeError, match="things is 1 events"):
        await check()


async def test_a_projection_no_longer_in_the_code_stops_counting_as_behind(
    engine, things
):
    retired = Projection(name="retired", tables={"retired_rows": "id text"})

    @retired.handles("ThingHappened")
    async def keep(tx: ProjectionTx, event: RecordedEvent) -> None:
        pass

    await ensure_created(engine, [retired])
    await wait_until_readable(things, await add_thing(things))
    [behind] = await lags(engine, ["retired"])

    assert await retire(engine, "retired")

    [after] = await lags(engine, ["retired"])
    assert (behind.events, after.events) == (1, 0)


async def test_lag_check_fails_while_the_projectors_have_never_run(engine, things):
    await wait_until_readable(things, await add_thing(things))
    await asyncio.sleep(0.05)

    with pytest.raises(RuntimeError, match="relay is 1 events"):
        await lag_check(engine, max_lag_s=0.0)()


async def test_lag_check_names_a_long_transaction_that_holds_the_log_back(
    engine, settings
):
    check = lag_check(engine, max_lag_s=1.0)
    await check()
    holder = await psycopg.AsyncConnection.connect(settings.psycopg_dsn)
    async with holder:
        # A transaction that has written (it has an id): readers of the log
        # cannot pass it while it stays open.
        await holder.execute("SELECT pg_current_xact_id()")
        await asyncio.sleep(1.5)

        with pytest.raises(RuntimeError, match=f"backend {holder.info.backend_pid}"):
            await check()
        await holder.rollback()

    await check()
