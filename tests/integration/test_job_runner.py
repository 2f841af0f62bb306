"""The worker's job runner against a real PostgreSQL, without Celery around it."""

import asyncio
import gc
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from shared.db import create_engine
from shared.event_store import NO_STREAM, EventMetadata, EventStore
from shared.events.job import (
    JobCancelRequested,
    JobProgressed,
    JobStarted,
    JobSubmitted,
)
from shared.jobs import JobCatalog, JobContext, load_catalog
from shared.jobs.state import JobState, job_stream
from shared.settings import Settings
from tests.tcp_proxy import TcpProxy
from workers import runner as runner_module
from workers.runner import MAX_LOST_RUNS, JobRunner, SessionLost

META = EventMetadata(source="tests")


@pytest.fixture
def runner(engine, store: EventStore, settings: Settings) -> JobRunner:
    fast = settings.model_copy(update={"job_retry_base_s": 0.5})
    return JobRunner(engine=engine, store=store, catalog=load_catalog(), settings=fast)


async def submit(
    store: EventStore,
    task: str,
    payload: dict,
    *,
    max_retries: int = 3,
    timeout_s: float = 300,
) -> uuid.UUID:
    job_id = uuid.uuid4()
    submitted = JobSubmitted(
        owner_id=uuid.uuid4(),
        task=task,
        payload=payload,
        max_retries=max_retries,
        timeout_s=timeout_s,
    )
    await store.append(
        job_stream(job_id), [submitted], expected_version=NO_STREAM, metadata=META
    )
    return job_id


async def types(store: EventStore, job_id: uuid.UUID) -> list[str]:
    return [e.type for e in await store.read_stream(job_stream(job_id))]


async def state_of(store: EventStore, job_id: uuid.UUID) -> JobState:
    return JobState.from_events(await store.read_stream(job_stream(job_id)))


async def test_a_job_runs_once_and_records_its_result(runner, store):
    job_id = await submit(store, "checksum", {"data": "abc", "algorithm": "md5"})

    assert await runner.run(job_id) == "succeeded"

    state = await state_of(store, job_id)
    assert await types(store, job_id) == ["JobSubmitted", "JobStarted", "JobSucceeded"]
    assert state.status == "SUCCESS"
    assert state.attempts == 1
    assert state.result_data == {
        "algorithm": "md5",
        "hexdigest": "900150983cd24fb0d6963f7d28e17f72",
    }


async def test_a_second_delivery_of_a_finished_job_does_nothing(runner, store):
    job_id = await submit(store, "echo", {"a": 1})
    await runner.run(job_id)

    assert await runner.run(job_id) == "finished"

    assert await types(store, job_id) == ["JobSubmitted", "JobStarted", "JobSucceeded"]


async def test_two_deliveries_at_once_run_the_job_once(runner, store):
    job_id = await submit(store, "sleep", {"seconds": 0.5})

    outcomes = await asyncio.gather(runner.run(job_id), runner.run(job_id))

    assert sorted(outcomes) == ["busy", "succeeded"]
    assert (await types(store, job_id)).count("JobStarted") == 1


async def test_a_job_cancelled_before_it_started_never_runs(runner, store):
    job_id = await submit(store, "echo", {})
    await store.append(
        job_stream(job_id), [JobCancelRequested()], expected_version=1, metadata=META
    )

    assert await runner.run(job_id) == "cancelled"

    assert await types(store, job_id) == [
        "JobSubmitted",
        "JobCancelRequested",
        "JobCancelled",
    ]


async def test_a_running_sleep_stops_when_cancelled(runner, store):
    job_id = await submit(store, "sleep", {"seconds": 120})
    running = asyncio.create_task(runner.run(job_id))
    state = await wait_for_status(store, job_id, "STARTED")

    await store.append(
        job_stream(job_id),
        [JobCancelRequested()],
        expected_version=state.version,
        metadata=META,
    )

    assert await asyncio.wait_for(running, 30) == "cancelled"
    final = await state_of(store, job_id)
    assert final.status == "REVOKED"
    assert final.history[-1] == "JobCancelled"


async def test_a_job_over_its_timeout_fails_saying_it_timed_out(runner, store):
    job_id = await submit(store, "sleep", {"seconds": 120}, timeout_s=0.5)

    assert await runner.run(job_id) == "failed"

    state = await state_of(store, job_id)
    assert state.status == "FAILURE"
    assert state.message == "timed out after 0.5 s"


async def test_a_handler_stopped_by_its_timeout_leaves_no_error_in_the_log(
    runner, store, caplog
):
    """The handler raises once it sees its stop, after the attempt has ended:
    that is expected, not an error nobody retrieved."""
    job_id = await submit(store, "sleep", {"seconds": 120}, timeout_s=0.3)

    assert await runner.run(job_id) == "failed"
    # The sleep notices its stop within a second, and its future is then dropped.
    await asyncio.sleep(1.5)
    gc.collect()

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_sleep_reports_progress_while_it_runs(runner, store):
    job_id = await submit(store, "sleep", {"seconds": 1.5})

    await runner.run(job_id)

    events = await store.read_stream(job_stream(job_id))
    progress = [e.data["progress"] for e in events if e.type == "JobProgressed"]
    assert progress
    assert progress == sorted(progress)
    assert len(progress) <= 4


class NoPayload(BaseModel):
    pass


async def test_progress_reported_too_soon_to_record_is_recorded_later(
    engine, store, settings
):
    catalog = JobCatalog()
    stream: list[str] = []

    def recorded_progress() -> int:
        with psycopg.connect(settings.psycopg_dsn) as connection:
            row = connection.execute(
                "SELECT count(*) FROM events"
                " WHERE stream_id = %s AND type = 'JobProgressed'",
                stream,
            ).fetchone()
        return row[0] if row else 0

    @catalog.task("two_steps")
    def two_steps(payload: NoPayload, context: JobContext) -> dict[str, Any]:
        context.progress(0.1)
        while not recorded_progress():
            context.sleep(0.02)
        # Just recorded: the next report comes inside the runner's interval.
        context.progress(0.5)
        context.sleep(1.5)
        return {}

    runner = JobRunner(engine=engine, store=store, catalog=catalog, settings=settings)
    job_id = await submit(store, "two_steps", {})
    stream.append(job_stream(job_id))

    assert await runner.run(job_id) == "succeeded"

    events = await store.read_stream(job_stream(job_id))
    progress = [e.data["progress"] for e in events if e.type == "JobProgressed"]
    assert progress == [0.1, 0.5]


async def test_a_retryable_failure_is_retried_with_backoff_then_fails(runner, store):
    job_id = await submit(
        store, "fail", {"message": "flaky", "retryable": True}, max_retries=2
    )

    assert await runner.run(job_id) == "retrying"
    assert await runner.run(job_id) == "not_due"
    outcomes = []
    for _ in range(2):
        state = await state_of(store, job_id)
        await asyncio.sleep(max(0.0, state.retry_at.timestamp() - _now()) + 0.05)
        outcomes.append(await runner.run(job_id))

    assert outcomes == ["retrying", "failed"]
    events = await store.read_stream(job_stream(job_id))
    retries = [e.data for e in events if e.type == "JobRetryScheduled"]
    assert [r["attempt"] for r in retries] == [1, 2]
    assert 0.25 <= retries[0]["delay_s"] <= 0.5
    assert 0.5 <= retries[1]["delay_s"] <= 1.0
    state = await state_of(store, job_id)
    assert (state.status, state.message, state.attempts) == ("FAILURE", "flaky", 3)


async def test_a_job_whose_worker_died_is_taken_over_as_a_new_attempt(runner, store):
    job_id = await submit(store, "echo", {"x": 1})
    await store.append(
        job_stream(job_id),
        [JobStarted(attempt=1, worker="gone/1")],
        expected_version=1,
        metadata=META,
    )

    assert await runner.run(job_id) == "succeeded"

    state = await state_of(store, job_id)
    assert state.attempts == 2
    assert state.history.count("JobSucceeded") == 1


async def lose_runs(store: EventStore, job_id: uuid.UUID, runs: int) -> None:
    """Record `runs` runs started by workers that were lost before they ended."""
    await store.append(
        job_stream(job_id),
        [JobStarted(attempt=n, worker=f"gone/{n}") for n in range(1, runs + 1)],
        expected_version=1,
        metadata=META,
    )


async def test_a_lost_run_spends_none_of_the_jobs_retries(runner, store):
    job_id = await submit(store, "echo", {"x": 1}, max_retries=0)
    await lose_runs(store, job_id, 1)

    assert await runner.run(job_id) == "succeeded"

    state = await state_of(store, job_id)
    assert (state.status, state.attempts, state.lost_runs) == ("SUCCESS", 2, 1)


async def test_retries_after_lost_runs_are_all_still_there(runner, store):
    job_id = await submit(
        store, "fail", {"message": "flaky", "retryable": True}, max_retries=1
    )
    await lose_runs(store, job_id, 2)

    assert await runner.run(job_id) == "retrying"


async def test_a_job_whose_runs_are_lost_again_and_again_fails_saying_so(runner, store):
    job_id = await submit(store, "echo", {}, max_retries=3)
    await lose_runs(store, job_id, MAX_LOST_RUNS + 1)

    assert await runner.run(job_id) == "failed"

    state = await state_of(store, job_id)
    assert state.message == (
        f"the worker running the job was lost ({MAX_LOST_RUNS + 1} times)"
    )


async def test_a_run_lost_long_ago_is_run_again_with_a_timeout_of_its_own(
    runner, store
):
    # All workers were down for longer than the job may run.
    job_id = await submit(store, "echo", {"x": 1}, timeout_s=0.2)
    await lose_runs(store, job_id, 1)
    await asyncio.sleep(0.3)

    assert await runner.run(job_id) == "succeeded"

    state = await state_of(store, job_id)
    assert (state.status, state.attempts) == ("SUCCESS", 2)


def said_about(caplog: pytest.LogCaptureFixture, job_id: uuid.UUID):
    """What the runner logged about the job at WARNING or above."""
    return [
        record
        for record in caplog.records
        if record.name == "workers.runner"
        and getattr(record, "job_id", None) == str(job_id)
        and record.levelno >= logging.WARNING
    ]


async def test_a_failed_job_is_a_warning_naming_its_task_attempt_and_message(
    runner, store, caplog
):
    job_id = await submit(store, "fail", {"message": "no such file"}, max_retries=0)

    assert await runner.run(job_id) == "failed"

    (line,) = said_about(caplog, job_id)
    assert line.levelno == logging.WARNING
    assert line.getMessage() == "job failed"
    assert (line.task, line.attempt, line.error) == ("fail", 1, "no such file")
    assert line.exc_info is None


async def test_an_attempt_that_failed_and_will_be_retried_is_a_warning(
    runner, store, caplog
):
    job_id = await submit(
        store, "fail", {"message": "flaky", "retryable": True}, max_retries=1
    )

    assert await runner.run(job_id) == "retrying"

    (line,) = said_about(caplog, job_id)
    assert line.levelno == logging.WARNING
    assert (line.outcome, line.attempt, line.error) == ("retrying", 1, "flaky")
    assert line.retry_in_s > 0


class Numbers(BaseModel):
    values: list[float]
    seconds: float = 0


@pytest.mark.parametrize("seconds", [0, 0.3], ids=["at-once", "after-a-while"])
async def test_a_bug_in_a_handler_is_an_error_with_its_traceback(
    engine, store, settings, caplog, seconds
):
    catalog = JobCatalog()

    @catalog.task("mean")
    def mean(payload: Numbers, context: JobContext) -> dict[str, Any]:
        context.sleep(payload.seconds)
        return {"mean": sum(payload.values) / len(payload.values)}

    runner = JobRunner(engine=engine, store=store, catalog=catalog, settings=settings)
    job_id = await submit(store, "mean", {"values": [], "seconds": seconds})

    assert await runner.run(job_id) == "failed"

    (line,) = said_about(caplog, job_id)
    assert line.levelno == logging.ERROR
    assert (line.task, line.error) == ("mean", "ZeroDivisionError: division by zero")
    traceback = logging.Formatter().formatException(line.exc_info)
    assert ", in mean" in traceback
    assert "ZeroDivisionError" in traceback
    state = await state_of(store, job_id)
    assert (state.status, state.message) == (
        "FAILURE",
        "ZeroDivisionError: division by zero",
    )


async def test_an_exception_the_task_retries_on_is_a_warning_not_a_bug(
    engine, store, settings, caplog
):
    catalog = JobCatalog()

    @catalog.task("fetch", retry_on=(ConnectionError,))
    def fetch(payload: NoPayload, context: JobContext) -> dict[str, Any]:
        raise ConnectionError("the source hung up")

    runner = JobRunner(engine=engine, store=store, catalog=catalog, settings=settings)
    job_id = await submit(store, "fetch", {}, max_retries=0)

    assert await runner.run(job_id) == "failed"

    (line,) = said_about(caplog, job_id)
    assert line.levelno == logging.WARNING
    assert line.error == "ConnectionError: the source hung up"
    assert line.exc_info is None


async def test_a_job_failed_for_its_lost_runs_is_a_warning_saying_so(
    runner, store, caplog
):
    job_id = await submit(store, "echo", {})
    await lose_runs(store, job_id, MAX_LOST_RUNS + 1)

    assert await runner.run(job_id) == "failed"

    (line,) = said_about(caplog, job_id)
    assert line.levelno == logging.WARNING
    assert line.getMessage() == "job failed"
    assert (line.kind, line.error) == (
        "worker_lost",
        f"the worker running the job was lost ({MAX_LOST_RUNS + 1} times)",
    )


async def wait_for_status(store: EventStore, job_id: uuid.UUID, status: str):
    for _ in range(600):
        state = await state_of(store, job_id)
        if state.status == status:
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"job never reached {status}")


def _now() -> float:
    return time.time()


async def test_a_run_whose_store_stops_answering_stops_its_handler_and_gives_up(
    engine, store, settings, monkeypatch
):
    monkeypatch.setattr(runner_module, "WATCH_READ_TIMEOUT_S", 0.5)
    catalog = JobCatalog()
    stopped = threading.Event()

    @catalog.task("wait_for_stop")
    def wait_for_stop(payload: NoPayload, context: JobContext) -> dict[str, Any]:
        if stopped.is_set():
            return {}  # the run after the stall
        try:
            context.sleep(300)
        finally:
            stopped.set()
        return {}

    job_id = await submit(store, "wait_for_stop", {}, timeout_s=300)
    with TcpProxy(5432) as proxy:
        url = make_url(settings.database_url).set(port=proxy.port)
        via_proxy = settings.model_copy(
            update={"database_url": url.render_as_string(hide_password=False)}
        )
        stalled = create_engine(via_proxy, pool_size=2)
        try:
            runner = JobRunner(
                engine=stalled,
                store=EventStore(stalled),
                catalog=catalog,
                settings=settings,
            )
            running = asyncio.create_task(runner.run(job_id))
            await wait_for_status(store, job_id, "STARTED")
            proxy.stall()

            with pytest.raises(SessionLost):
                await asyncio.wait_for(running, 30)
            assert await asyncio.to_thread(stopped.wait, 10)
        finally:
            proxy.flow()
            await stalled.dispose()

    # The lock goes once the server sees the abandoned session end (here, when
    # the proxy closes it); then the next delivery takes over.
    runner = JobRunner(engine=engine, store=store, catalog=catalog, settings=settings)
    for _ in range(300):
        outcome = await runner.run(job_id)
        if outcome != "busy":
            break
        await asyncio.sleep(0.1)
    assert outcome == "succeeded"


async def test_progress_is_recorded_in_steps_worth_showing(engine, store, settings):
    catalog = JobCatalog()

    @catalog.task("creep")
    def creep(payload: NoPayload, context: JobContext) -> dict[str, Any]:
        # 0.5 % in all, in a thousand reports over 2 s; then 3 % at once.
        for i in range(1, 1001):
            context.progress(i * 0.000005)
            context.sleep(0.002)
        context.progress(0.035)
        context.sleep(1.2)
        return {}

    runner = JobRunner(engine=engine, store=store, catalog=catalog, settings=settings)
    job_id = await submit(store, "creep", {})

    assert await runner.run(job_id) == "succeeded"

    events = await store.read_stream(job_stream(job_id))
    progress = [e.data["progress"] for e in events if e.type == "JobProgressed"]
    assert progress == [0.035]


async def test_a_new_attempt_records_its_progress_from_zero(engine, store, settings):
    catalog = JobCatalog()

    @catalog.task("half_way")
    def half_way(payload: NoPayload, context: JobContext) -> dict[str, Any]:
        context.progress(0.5)
        context.sleep(1.2)
        return {}

    job_id = await submit(store, "half_way", {})
    # A first run got half way, then its worker was lost.
    await store.append(
        job_stream(job_id),
        [
            JobStarted(attempt=1, worker="gone/1"),
            JobProgressed(attempt=1, progress=0.5),
        ],
        expected_version=1,
        metadata=META,
    )
    runner = JobRunner(engine=engine, store=store, catalog=catalog, settings=settings)

    assert await runner.run(job_id) == "succeeded"

    events = await store.read_stream(job_stream(job_id))
    second = [e.data["progress"] for e in events[3:] if e.type == "JobProgressed"]
    assert second == [0.5]


async def test_a_handler_that_ignores_its_stop_does_not_hold_up_later_jobs(
    engine, store, settings, caplog
):
    catalog = JobCatalog()

    @catalog.task("stubborn")
    def stubborn(payload: NoPayload, context: JobContext) -> dict[str, Any]:
        time.sleep(3)  # never looks at its context
        return {}

    @catalog.task("quick")
    def quick(payload: NoPayload, context: JobContext) -> dict[str, Any]:
        return {"done": True}

    runner = JobRunner(
        engine=engine,
        store=store,
        catalog=catalog,
        settings=settings,
        executor=ThreadPoolExecutor(max_workers=1),
    )
    stuck = await submit(store, "stubborn", {}, timeout_s=0.2)
    later = await submit(store, "quick", {}, timeout_s=1)

    assert await runner.run(stuck) == "failed"
    assert await runner.run(later) == "succeeded"
    assert "job handler ignored its stop" in caplog.text
