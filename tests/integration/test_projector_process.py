"""`python -m projectors`: everything runs together and stops cleanly."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid

from projectors import runner
from projectors.framework import ProjectionTx, ensure_created
from projectors.runner import run
from shared.checkpoints import checkpoint
from shared.db import connect
from shared.event_store import (
    LOG_START,
    NO_STREAM,
    EventMetadata,
    EventStore,
    RecordedEvent,
)
from shared.settings import Settings
from tests.broker import delete_broker_objects
from tests.sample_events import ThingHappened, sample_events
from tests.sample_projection import ThingNoted, make_projection

META = EventMetadata(source="tests")


async def test_stale_tables_are_rebuilt_on_start_and_new_events_projected(
    settings, engine
):
    store = EventStore(engine, sample_events)
    await ensure_created(engine, [make_projection()])
    await store.append(
        f"thing-{uuid.uuid4()}",
        [ThingHappened(name="before", size=1)],
        expected_version=NO_STREAM,
        metadata=META,
    )
    changed = make_projection()
    changed.tables["things"] += ", colour text"
    stopping = asyncio.Event()
    running = asyncio.create_task(run(settings, stopping, projections=[changed]))
    try:
        last = await store.append(
            f"thing-{uuid.uuid4()}",
            [ThingHappened(name="after", size=2)],
            expected_version=NO_STREAM,
            metadata=META,
        )
        target = await store.locate(last.last_position)
        assert target is not None
        async with asyncio.timeout(60):
            while True:
                if await checkpoint(engine, "things") >= target:
                    break
                await asyncio.sleep(0.05)
    finally:
        stopping.set()
        await asyncio.wait_for(running, 30)
        await delete_broker_objects(settings, f"{settings.events_exchange}.things")

    async with connect(engine) as connection:
        names = await connection.exec_driver_sql(
            "SELECT name, colour FROM things ORDER BY size"
        )
        generation = await connection.exec_driver_sql(
            "SELECT live_generation FROM projection_state WHERE name = 'things'"
        )
        assert names.all() == [("before", None), ("after", None)]
        assert generation.scalar_one() == 2


def test_the_projector_process_stops_cleanly_on_sigterm(settings, database_url):
    environment = {
        **os.environ,
        "HELIX_DATABASE_URL": database_url,
        "HELIX_EVENTS_EXCHANGE": settings.events_exchange,
        "HELIX_JOBS_QUEUE": settings.jobs_queue,
        "HELIX_LOG_FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "projectors"],
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "projectors running" in line:
                break
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        queues = [
            f"{settings.events_exchange}.{name}"
            for name in ("users", "jobs", "dispatcher")
        ]
        asyncio.run(delete_broker_objects(settings, *queues))

    assert process.returncode == 0, errors
    assert "projectors stopped" in errors


async def test_a_start_while_postgres_is_down_waits_for_it_and_still_stops():
    unreachable = Settings(
        env="test",
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/none",
        database_connect_timeout_s=1,
    )
    stopping = asyncio.Event()
    running = asyncio.create_task(
        run(unreachable, stopping, projections=[make_projection()])
    )

    await asyncio.sleep(1.5)
    waiting = not running.done()
    stopping.set()
    await asyncio.wait_for(running, 10)

    assert waiting, "the process gave up instead of waiting for PostgreSQL"


async def test_a_catch_up_that_would_not_end_is_cancelled_on_stop(
    settings, engine, monkeypatch
):
    store = EventStore(engine, sample_events)
    stuck = make_projection()
    applying = asyncio.Event()

    @stuck.handles("ThingNoted")
    async def never_done(tx: ProjectionTx, event: RecordedEvent) -> None:
        applying.set()
        await asyncio.sleep(3600)

    await ensure_created(engine, [stuck])
    await store.append(
        f"thing-{uuid.uuid4()}",
        [ThingHappened(name="a"), ThingNoted(note="forever")],
        expected_version=NO_STREAM,
        metadata=META,
    )
    monkeypatch.setattr(runner, "STOP_GRACE_S", 1.0)
    # No broker: the consumer keeps the table moving from the store instead.
    offline = settings.model_copy(
        update={"rabbitmq_url": "amqp://guest:guest@127.0.0.1:1//"}
    )
    stopping = asyncio.Event()
    running = asyncio.create_task(run(offline, stopping, projections=[stuck]))
    await asyncio.wait_for(applying.wait(), 30)

    stopping.set()
    await asyncio.wait_for(running, 15)

    assert await checkpoint(engine, "things") == LOG_START
