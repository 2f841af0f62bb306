"""`python -m projectors`: everything runs together and stops cleanly."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid

from projectors.framework import ensure_created
from projectors.runner import run
from shared.checkpoints import checkpoint
from shared.db import connect
from shared.event_store import NO_STREAM, EventMetadata, EventStore
from tests.broker import delete_broker_objects
from tests.sample_events import ThingHappened, sample_events
from tests.sample_projection import make_projection

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
