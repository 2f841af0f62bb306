"""The jobs read model follows each job's stream, against a real PostgreSQL."""

import asyncio
import uuid

import pytest

from projectors.framework import catch_up, ensure_created
from projectors.projections.jobs import projection
from shared.event_store import EventMetadata
from shared.events.job import JobCancelRequested
from shared.jobs import load_catalog
from shared.jobs.state import job_stream
from tests.integration.test_job_runner import submit
from workers.runner import JobRunner

META = EventMetadata(source="tests")


@pytest.fixture
async def runner(engine, store, settings):
    await ensure_created(engine, [projection])
    return JobRunner(
        engine=engine, store=store, catalog=load_catalog(), settings=settings
    )


async def row_of(engine, store, job_id: uuid.UUID) -> dict:
    # Up to the job's last event, however long other transactions on the server
    # hold back the log's read horizon.
    last = (await store.read_stream(job_stream(job_id)))[-1]
    for _ in range(1200):
        if await store.head() >= last.log_position:
            break
        await asyncio.sleep(0.05)
    await catch_up(engine, projection, store=store, until=last.log_position)
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(
            "SELECT * FROM job_statuses WHERE id = %s", (job_id,)
        )
        return dict(result.mappings().one())


async def test_a_submitted_job_is_pending(runner, engine, store):
    job_id = await submit(store, "echo", {"a": 1})

    row = await row_of(engine, store, job_id)

    assert (row["status"], row["task"], row["attempts"]) == ("PENDING", "echo", 0)
    assert row["started_at"] is None


async def test_a_succeeded_job_has_its_result_progress_and_times(runner, engine, store):
    job_id = await submit(store, "text_stats", {"text": "a b a", "top": 1})
    await runner.run(job_id)

    row = await row_of(engine, store, job_id)

    events = await store.read_stream(job_stream(job_id))
    assert row["status"] == "SUCCESS"
    assert row["result_data"] == {
        "lines": 1,
        "words": 3,
        "characters": 5,
        "top_words": [["a", 2]],
    }
    assert (row["progress"], row["attempts"], row["message"]) == (1.0, 1, None)
    assert row["submitted_at"] == events[0].recorded_at
    assert row["started_at"] == events[1].recorded_at
    assert row["finished_at"] == events[-1].recorded_at
    assert row["version"] == events[-1].version


async def test_a_failed_job_has_its_message(runner, engine, store):
    job_id = await submit(store, "fail", {"message": "no luck"})
    await runner.run(job_id)

    row = await row_of(engine, store, job_id)

    assert (row["status"], row["message"]) == ("FAILURE", "no luck")


async def test_a_job_waiting_for_a_retry_shows_retry_and_when(runner, engine, store):
    job_id = await submit(store, "fail", {"message": "later", "retryable": True})
    await runner.run(job_id)

    row = await row_of(engine, store, job_id)

    assert (row["status"], row["message"], row["attempts"]) == ("RETRY", "later", 1)
    assert row["retry_at"] is not None


async def test_a_cancelled_job_is_revoked(runner, engine, store):
    job_id = await submit(store, "echo", {})
    await store.append(
        job_stream(job_id), [JobCancelRequested()], expected_version=1, metadata=META
    )
    await runner.run(job_id)

    row = await row_of(engine, store, job_id)

    assert (row["status"], row["message"]) == ("REVOKED", "cancelled")
    assert row["cancel_requested"] is True


async def test_events_applied_again_or_one_by_one_give_the_same_rows(
    runner, engine, store
):
    retried = await submit(store, "fail", {"message": "x", "retryable": True})
    succeeded = await submit(store, "sleep", {"seconds": 0.6})
    await runner.run(retried)
    await runner.run(succeeded)
    events = [
        *(await store.read_stream(job_stream(retried))),
        *(await store.read_stream(job_stream(succeeded))),
    ]
    assert "JobProgressed" in [e.type for e in events]
    tables = projection.generation_tables(1)

    async def rows_after(batches: list[list]) -> list[dict]:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("DELETE FROM job_statuses_g1")
            for batch in batches:
                await projection.apply(connection, tables, batch)
            result = await connection.exec_driver_sql(
                "SELECT * FROM job_statuses_g1 ORDER BY submitted_at"
            )
            return [dict(row) for row in result.mappings()]

    at_once = await rows_after([events])
    twice = await rows_after([events, events])
    one_by_one = await rows_after([[event] for event in events])

    assert len(at_once) == 2
    assert [row["status"] for row in at_once] == ["RETRY", "SUCCESS"]
    assert twice == at_once
    assert one_by_one == at_once
