"""The job dispatcher against real PostgreSQL and RabbitMQ, with no worker."""

import asyncio
import contextlib
import json
import logging
import uuid
from datetime import UTC, datetime, timedelta

import aio_pika
import psycopg
import pytest

from projectors.dispatcher import Dispatcher
from projectors.framework import catch_up, ensure_created
from projectors.projections.jobs import projection as jobs_projection
from projectors.relay import declare_exchange, routing_key
from shared.checkpoints import create_checkpoint, lags
from shared.db import transaction
from shared.event_store import NO_STREAM, EventMetadata, EventStore
from shared.events.job import (
    JobCancelRequested,
    JobRetryScheduled,
    JobStarted,
    JobSubmitted,
)
from shared.events.registry import DomainEvent
from shared.jobs.messaging import DISPATCHER, RUN_JOB_TASK
from shared.jobs.state import job_lock_key, job_stream

META = EventMetadata(source="tests")


async def submit(store: EventStore) -> uuid.UUID:
    job_id = uuid.uuid4()
    event = JobSubmitted(
        owner_id=uuid.uuid4(), task="echo", payload={}, max_retries=3, timeout_s=60
    )
    await store.append(
        job_stream(job_id), [event], expected_version=NO_STREAM, metadata=META
    )
    return job_id


@pytest.fixture
async def tasks(settings):
    """The Celery messages that reach the jobs queue: (headers, args)."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(settings.jobs_queue, durable=True)
    received: asyncio.Queue = asyncio.Queue()

    async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            args, _, _ = json.loads(message.body)
            received.put_nowait((message.headers, args))

    await queue.consume(collect)
    yield received
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()


@pytest.fixture
async def dispatcher(settings, engine):
    stopping = asyncio.Event()
    dispatcher = Dispatcher(settings, engine)
    running = asyncio.create_task(dispatcher.run(stopping))
    await asyncio.wait_for(dispatcher.consuming.wait(), 30)
    yield dispatcher
    stopping.set()
    await asyncio.wait_for(running, 30)


async def test_a_job_submitted_before_the_dispatcher_started_is_dispatched(
    store, settings, engine, tasks
):
    job_id = await submit(store)
    # Readable in the log before the dispatcher starts (no broker message for it).
    last = (await store.read_stream(job_stream(job_id)))[-1]
    for _ in range(600):
        if await store.head() >= last.log_position:
            break
        await asyncio.sleep(0.05)

    stopping = asyncio.Event()
    running = asyncio.create_task(Dispatcher(settings, engine).run(stopping))
    headers, args = await asyncio.wait_for(tasks.get(), 30)
    stopping.set()
    await asyncio.wait_for(running, 30)

    assert headers["task"] == RUN_JOB_TASK
    assert args == [str(job_id)]


async def test_a_published_retry_is_dispatched_with_its_eta(
    store, settings, tasks, dispatcher
):
    job_id = await submit(store)
    await asyncio.wait_for(tasks.get(), 30)
    retry_at = datetime.now(UTC) + timedelta(seconds=30)
    retry = JobRetryScheduled(attempt=1, message="later", delay_s=30, retry_at=retry_at)
    await store.append(
        job_stream(job_id),
        [JobStarted(attempt=1, worker="w/1"), retry],
        expected_version=1,
        metadata=META,
    )
    recorded = (await store.read_stream(job_stream(job_id)))[-1]
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_exchange(channel, settings.events_exchange)
        await exchange.publish(
            aio_pika.Message(json.dumps(recorded.envelope()).encode()),
            routing_key(recorded),
        )

    headers, args = await asyncio.wait_for(tasks.get(), 30)

    assert args == [str(job_id)]
    assert datetime.fromisoformat(headers["eta"]) == retry_at


async def test_task_sent_events_nobody_listens_to_are_dropped_quietly(
    store, settings, engine, tasks, caplog
):
    """With no Flower bound to Celery's event exchange, sending logs no error."""
    await submit(store)
    stopping = asyncio.Event()
    running = asyncio.create_task(Dispatcher(settings, engine).run(stopping))
    try:
        await asyncio.wait_for(tasks.get(), 30)
        # Long enough for a returned event to come back and be logged.
        await asyncio.sleep(0.5)
    finally:
        stopping.set()
        await asyncio.wait_for(running, 30)

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_each_task_is_announced_to_flower_with_a_task_sent_event(
    store, settings, engine, tasks
):
    """Flower learns of a task when it is sent, as from Celery's own client."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        events = await channel.declare_exchange(
            "celeryev", aio_pika.ExchangeType.TOPIC, durable=True
        )
        watcher = await channel.declare_queue(exclusive=True)
        await watcher.bind(events, "task.sent")
        job_id = await submit(store)
        stopping = asyncio.Event()
        running = asyncio.create_task(Dispatcher(settings, engine).run(stopping))
        try:
            headers, _ = await asyncio.wait_for(tasks.get(), 30)
            async with asyncio.timeout(30):
                async for message in watcher.iterator():
                    sent = json.loads(message.body)
                    if sent["uuid"] == headers["id"]:
                        break
        finally:
            stopping.set()
            await asyncio.wait_for(running, 30)

    assert sent["type"] == "task-sent"
    assert sent["name"] == RUN_JOB_TASK
    assert sent["args"] == repr([str(job_id)])
    assert sent["queue"] == settings.jobs_queue
    assert sent["hostname"].startswith("dispatcher@")
    assert isinstance(sent["clock"], int) and sent["timestamp"] > 0


async def test_the_dispatchers_lag_counts_only_the_events_it_dispatches(store, engine):
    async with transaction(engine) as connection:
        await create_checkpoint(connection, DISPATCHER)
    job_id = await submit(store)
    await store.append(
        job_stream(job_id),
        [JobStarted(attempt=1, worker="w/1")],
        expected_version=1,
        metadata=META,
    )
    async with asyncio.timeout(30):
        while True:
            if len(await store.read_all()) == 2:
                break
            await asyncio.sleep(0.01)

    (lag,) = await lags(engine, [DISPATCHER])

    assert lag.events == 1


async def stale_job(store: EventStore, engine, *then: DomainEvent) -> uuid.UUID:
    """A job the jobs projection shows unchanged for an hour (PENDING, or as
    the events `then` leave it): its task is lost."""
    job_id = await submit(store)
    if then:
        await store.append(
            job_stream(job_id), list(then), expected_version=1, metadata=META
        )
    await ensure_created(engine, [jobs_projection])
    await catch_up(engine, jobs_projection, store=store)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "UPDATE job_statuses SET updated_at = now() - interval '1 hour'"
            " WHERE id = %s",
            (job_id,),
        )
    return job_id


@contextlib.asynccontextmanager
async def job_lock_held(settings, job_id: uuid.UUID):
    """A session holding the job's lock, as a worker running it does."""
    session = await psycopg.AsyncConnection.connect(
        settings.psycopg_dsn, autocommit=True
    )
    async with session:
        await session.execute(
            f"SELECT pg_advisory_lock({job_lock_key('%s')})", (job_stream(job_id),)
        )
        yield session


async def test_a_job_whose_task_was_lost_is_sent_again(
    store, engine, tasks, dispatcher
):
    job_id = await stale_job(store, engine)
    first, _ = await asyncio.wait_for(tasks.get(), 30)

    assert await dispatcher.redispatch_lost() == 1

    again, args = await asyncio.wait_for(tasks.get(), 30)
    assert args == [str(job_id)]
    assert again["task"] == RUN_JOB_TASK and again["id"] != first["id"]


async def test_a_job_a_worker_holds_is_not_sent_again(
    store, engine, settings, tasks, dispatcher
):
    job_id = await stale_job(store, engine)
    await asyncio.wait_for(tasks.get(), 30)
    async with job_lock_held(settings, job_id):
        assert await dispatcher.redispatch_lost() == 0


@contextlib.asynccontextmanager
async def task_left_waiting(settings, dispatcher: Dispatcher):
    """Once the job's first task waits in the jobs queue, which nobody consumes;
    the queue is deleted after."""
    try:
        async with asyncio.timeout(30):
            while True:
                if await dispatcher.sender.waiting():
                    break
                await asyncio.sleep(0.05)
        yield
    finally:
        connection = await aio_pika.connect(settings.rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(settings.jobs_queue)


async def test_nothing_is_sent_again_while_tasks_wait_in_the_queue(
    store, engine, settings, dispatcher
):
    await stale_job(store, engine)
    async with task_left_waiting(settings, dispatcher):
        assert await dispatcher.redispatch_lost() == 0


async def test_a_started_job_no_one_runs_is_sent_again_whatever_waits(
    store, engine, settings, dispatcher
):
    # Its run was lost, and the delivery given back was dropped as a duplicate.
    await stale_job(store, engine, JobStarted(attempt=1, worker="gone/1"))
    async with task_left_waiting(settings, dispatcher):
        assert await dispatcher.redispatch_lost() == 1
        assert await dispatcher.sender.waiting() == 2


async def test_a_failed_look_for_lost_tasks_does_not_stop_dispatching(
    store, settings, engine, tasks, caplog
):
    # Looks at every turn, and fails: there is no jobs read model here.
    stopping = asyncio.Event()
    dispatcher = Dispatcher(settings, engine, redispatch_every_s=0.0)
    running = asyncio.create_task(dispatcher.run(stopping))
    try:
        await asyncio.wait_for(dispatcher.consuming.wait(), 30)
        job_id = await submit(store)

        _, args = await asyncio.wait_for(tasks.get(), 30)
    finally:
        stopping.set()
        await asyncio.wait_for(running, 30)

    assert args == [str(job_id)]
    assert "looking for jobs that lost their task failed" in caplog.text


@pytest.mark.parametrize("past", ["its timeout", "a cancel"])
async def test_a_run_hung_long_past_its_end_is_ended_and_its_job_sent_again(
    store, engine, settings, tasks, dispatcher, past
):
    job_id = await submit(store)
    events = [JobStarted(attempt=1, worker="frozen/1")]
    if past == "a cancel":
        events.append(JobCancelRequested())
    await store.append(job_stream(job_id), events, expected_version=1, metadata=META)
    await asyncio.wait_for(tasks.get(), 30)
    await ensure_created(engine, [jobs_projection])
    await catch_up(engine, jobs_projection, store=store)
    started_at = "now() - interval '1 hour'" if past == "its timeout" else "now()"
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            f"UPDATE job_statuses SET started_at = {started_at},"
            " updated_at = now() - interval '1 hour' WHERE id = %s",
            (job_id,),
        )
    # A worker that stopped (SIGSTOP, a frozen host) while it held the job: its
    # session stays open, and with it the lock.
    async with job_lock_held(settings, job_id) as frozen:
        assert await dispatcher.redispatch_lost() == 1

        _, args = await asyncio.wait_for(tasks.get(), 30)
        assert args == [str(job_id)]
        with pytest.raises(psycopg.OperationalError):
            await frozen.execute("SELECT 1")


async def test_a_run_within_its_time_keeps_its_session(
    store, engine, settings, tasks, dispatcher
):
    job_id = await submit(store)
    await store.append(
        job_stream(job_id),
        [JobStarted(attempt=1, worker="busy/1")],
        expected_version=1,
        metadata=META,
    )
    await ensure_created(engine, [jobs_projection])
    await catch_up(engine, jobs_projection, store=store)
    async with job_lock_held(settings, job_id) as running:
        assert await dispatcher.end_hung_runs() == []
        await running.execute("SELECT 1")


async def test_a_later_attempt_the_read_model_has_not_seen_keeps_its_session(
    store, engine, settings, tasks, dispatcher
):
    # The read model shows attempt 1 started an hour ago; the log has moved on
    # to a retry and a second attempt, whose worker holds the lock.
    job_id = await stale_job(store, engine, JobStarted(attempt=1, worker="w/1"))
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "UPDATE job_statuses SET started_at = now() - interval '1 hour'"
            " WHERE id = %s",
            (job_id,),
        )
    retry_at = datetime.now(UTC)
    await store.append(
        job_stream(job_id),
        [
            JobRetryScheduled(
                attempt=1, message="flaky", delay_s=0.0, retry_at=retry_at
            ),
            JobStarted(attempt=2, worker="w/2"),
        ],
        expected_version=2,
        metadata=META,
    )
    async with job_lock_held(settings, job_id) as healthy:
        assert await dispatcher.end_hung_runs() == []
        await healthy.execute("SELECT 1")
