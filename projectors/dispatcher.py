"""The job dispatcher: turns JobSubmitted and JobRetryScheduled into Celery tasks.

It consumes its own durable queue, `<events_exchange>.dispatcher`, bound to those
two event types, and sends the worker's task by name (`helix.jobs.run`, with the
job id) to `settings.jobs_queue`; a retry is sent with the ETA the event names.
Tasks go out as Celery's own client would send them (message protocol 2, with
the task-sent event that Flower shows), but over the dispatcher's aio-pika
connection: a batch is published at once and its confirms awaited together, with
no thread and no wait per task. A message is acknowledged only after the broker
confirmed the task. The "dispatcher" checkpoint is saved every half second
while busy and once idle, not per batch; a crash therefore sends the tasks of the
last moments again and never loses one. Sending twice is harmless: the worker
runs a job at most once.

On start, and whenever it has been idle a while, the dispatcher also reads the
log after its checkpoint, so an event it never received from the broker (the
queue did not exist yet when the relay published it) is dispatched all the same.

Once a minute it also looks for jobs whose task message was lost after it was
sent (a purged queue, a broker that lost its disk): PENDING, STARTED or due for a
retry for `settings.job_redispatch_after_s`, no worker holding the job's lock,
and nothing waiting in the jobs queue; or STARTED for ORPHANED_AFTER_S with no
worker holding its lock, whatever the queue holds (a run that was lost, whose
delivery given back found the lock still held and was dropped). Those are sent
again; a job that turns out to be running or finished after all makes the second
delivery a no-op.

In the same look it ends hung runs. A worker that holds a job's lock
HUNG_AFTER_S past the job's timeout, or that long after a cancel, is not running
it any more: it stopped (SIGSTOP, a frozen VM) or its link stalls, with its
session still open, so the lock never goes by itself. Its database session is
terminated, which frees the lock, and the job's task is sent again: the next
delivery cancels the job, or runs it again as a lost run.
"""

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
)
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.batches import consume_in_batches, every
from projectors.relay import BROKER_ERRORS, declare_exchange
from projectors.task_sender import TaskSender
from shared.checkpoints import checkpoint, read_checkpoint, save_checkpoint
from shared.db import create_engine, transaction
from shared.event_store import EventStore, LogPosition
from shared.jobs.messaging import (
    DISPATCHED_TYPES,
    DISPATCHER,
    celery_app,
)
from shared.jobs.state import job_lock_key
from shared.settings import Settings

log = logging.getLogger(__name__)

CHECKPOINT = DISPATCHER
PREFETCH = 500
BATCH_SIZE = 200
IDLE_CATCH_UP_S = 5.0
SAVE_EVERY_S = 0.5
REDISPATCH_EVERY_S = 60.0
REDISPATCH_LIMIT = 100
POOL_SIZE = 2
# Any fixed number: one process at a time looks for lost tasks.
REDISPATCH_LOCK_KEY = 0x48454C4958524544  # "HELIXRED"

# The key of row j's job lock (`lock.k`), and the condition that pg_locks row l
# is that lock: pg_locks shows a bigint key split in two halves, objsubid 1.
_JOB_STREAM = "'job-' || j.id::text"
_JOB_LOCK = f"CROSS JOIN LATERAL (SELECT {job_lock_key(_JOB_STREAM)} AS k) lock"
_HOLDS_JOB_LOCK = """(
    l.locktype = 'advisory' AND l.objsubid = 1
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND l.classid = ((lock.k >> 32) & 4294967295)::text::oid
    AND l.objid = (lock.k & 4294967295)::text::oid
)"""

# Jobs that should have a task message somewhere and show no sign of one. The
# worker holds the job's advisory lock while it runs it.
_STALE_JOBS = f"""
SELECT j.id FROM job_statuses j
{_JOB_LOCK}
WHERE (
        (%(nothing_waiting)s AND j.status = 'PENDING'
         AND j.updated_at < now() - %(after)s)
     OR (%(nothing_waiting)s AND j.status = 'RETRY'
         AND j.retry_at < now() - %(after)s)
        -- STARTED with nobody holding its lock: running nowhere, whatever the
        -- queue holds (a delivery given back may have been dropped as busy).
     OR (j.status = 'STARTED' AND j.updated_at < now() - %(orphaned_after)s)
      )
  AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE {_HOLDS_JOB_LOCK})
  AND pg_try_advisory_xact_lock(%(sweep_key)s)
ORDER BY j.updated_at
LIMIT %(limit)s
"""


# STARTED jobs whose runner holds their lock long past the end it should have
# made (the timeout, or a cancel), with the backend that holds it.
_HUNG_RUNS = f"""
WITH hung AS (
    SELECT j.id, l.pid FROM job_statuses j
    {_JOB_LOCK}
    JOIN pg_locks l ON l.granted AND {_HOLDS_JOB_LOCK}
    WHERE j.status = 'STARTED'
      AND (j.started_at + make_interval(secs => j.timeout_s) < now() - %(after)s
           OR (j.cancel_requested AND j.updated_at < now() - %(after)s))
      -- The read model may lag: only a row the log still agrees with, or a
      -- later, healthy attempt would lose its session.
      AND j.version = (SELECT max(e.version) FROM events e
                       WHERE e.stream_id = {_JOB_STREAM})
      AND pg_try_advisory_xact_lock(%(sweep_key)s)
    ORDER BY j.started_at
    LIMIT %(limit)s
)
SELECT id, pid FROM (
    SELECT id, pid, pg_terminate_backend(pid, 5000) AS ended FROM hung
) terminated
WHERE ended
"""
HUNG_AFTER_S = 60.0
# A STARTED job whose lock nobody holds this long is sent again.
ORPHANED_AFTER_S = 30.0


def queue_name(settings: Settings) -> str:
    return f"{settings.events_exchange}.dispatcher"


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        celery: Celery | None = None,
        *,
        redispatch_every_s: float = REDISPATCH_EVERY_S,
        hung_after_s: float = HUNG_AFTER_S,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redispatch_every_s = redispatch_every_s
        self.hung_after_s = hung_after_s
        self.store = EventStore(engine)
        self.sender = TaskSender(
            celery or celery_app(settings, name="helixnet-dispatcher"),
            settings.jobs_queue,
        )
        self.consuming = asyncio.Event()
        self.dispatched = 0
        # What this process dispatched up to, and what it last saved. Another
        # process can only have moved the checkpoint further, so a stale value
        # sends a task twice at worst; it saves a read per batch.
        self._position: LogPosition | None = None
        self._saved: LogPosition | None = None
        self._saved_at = 0.0
        self._redispatched_at = time.monotonic()

    async def run(self, stopping: asyncio.Event) -> None:
        backoff_s = 0.1
        while not stopping.is_set():
            try:
                await self._consume(stopping)
                backoff_s = 0.1
            except Exception:
                log.exception("job dispatcher failed, reconnecting")
                self.consuming.clear()
                try:
                    await asyncio.wait_for(stopping.wait(), backoff_s)
                except TimeoutError:
                    backoff_s = min(backoff_s * 2, 5.0)

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        exchange = await declare_exchange(channel, self.settings.events_exchange)
        queue = await channel.declare_queue(
            queue_name(self.settings),
            durable=True,
            arguments={"x-single-active-consumer": True},
        )
        for event_type in DISPATCHED_TYPES:
            await queue.bind(exchange, f"job.{event_type}")
        return queue

    async def _consume(self, stopping: asyncio.Event) -> None:
        connection = await aio_pika.connect(self.settings.rabbitmq_url, timeout=5)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            queue = await self.declare(channel)
            await self.sender.open(connection)
            # After declaring the queue: what the relay publishes from now on is
            # queued, and everything before it comes from the store.
            await self.catch_up()
            await consume_in_batches(
                connection,
                queue,
                stopping,
                batch_size=BATCH_SIZE,
                handle=self._handle_batch,
                idle=self._idle,
                consuming=self.consuming,
            )
            await self.save()
        self.consuming.clear()

    async def _handle_batch(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        await self._redispatch_when_due()
        await self.handle(messages)

    async def _idle(self, idle_ticks: int) -> None:
        await self._redispatch_when_due()
        await self.save()
        if every(IDLE_CATCH_UP_S, idle_ticks):
            await self.catch_up()

    async def _redispatch_when_due(self) -> None:
        if time.monotonic() - self._redispatched_at < self.redispatch_every_s:
            return
        self._redispatched_at = time.monotonic()
        try:
            await self.redispatch_lost()
        except BROKER_ERRORS:
            raise  # the connection is gone: reconnect, as for any other send
        except Exception:
            # A side job: dispatching goes on, and the next look is a minute away.
            log.exception("looking for jobs that lost their task failed")

    async def handle(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Send the tasks of a batch of delivered events past the checkpoint."""
        current = self._position or await checkpoint(self.engine, CHECKPOINT)
        tasks: dict[LogPosition, dict[str, Any]] = {}
        for message in messages:
            try:
                envelope = json.loads(message.body)
                position = LogPosition(
                    int(envelope["transaction_id"]), int(envelope["position"])
                )
                if position > current and envelope["type"] in DISPATCHED_TYPES:
                    tasks[position] = _task_for(envelope)
            except (ValueError, KeyError, TypeError) as exc:
                # The log has it anyway; the next catch-up finds it.
                log.error(
                    "dropping a malformed message",
                    extra={"message_id": message.message_id, "error": str(exc)},
                )
        if tasks:
            await self._send([tasks[key] for key in sorted(tasks)])
            self._position = max(current, *tasks)
            if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                await self.save()

    async def save(self) -> None:
        """Save the checkpoint, if this process dispatched past what it saved."""
        if self._position is not None and self._position != self._saved:
            await self._save(self._position)

    async def catch_up(self) -> None:
        """Dispatch what the log holds after the checkpoint, up to its head."""
        position = await checkpoint(self.engine, CHECKPOINT)
        head = await self.store.head()
        while position < head:
            page = await self.store.read_all(
                position, limit=BATCH_SIZE, types=DISPATCHED_TYPES, until=head
            )
            if page:
                await self._send([_task_for(event.envelope()) for event in page])
            position = page[-1].log_position if len(page) == BATCH_SIZE else head
            await self._save(position)

    async def redispatch_lost(self) -> int:
        """Send again the tasks of jobs that lost theirs, and of hung runs once
        ended; how many were sent."""
        # While tasks wait in the queue, those of PENDING and RETRY jobs may
        # well be among them.
        nothing_waiting = not await self.sender.waiting()
        lost = await self._lost_tasks(nothing_waiting=nothing_waiting)
        await self._send_again(lost)
        # After: a hung run's job is locked until now, so it is not among those.
        try:
            hung = await self.end_hung_runs()
        except Exception:
            log.exception("looking for hung job runs failed")
            hung = []
        await self._send_again(hung)
        return len(lost) + len(hung)

    async def _lost_tasks(self, *, nothing_waiting: bool) -> list[str]:
        """The jobs whose task message seems lost."""
        params = {
            "after": timedelta(seconds=self.settings.job_redispatch_after_s),
            "orphaned_after": timedelta(seconds=ORPHANED_AFTER_S),
            "nothing_waiting": nothing_waiting,
            "sweep_key": REDISPATCH_LOCK_KEY,
            "limit": REDISPATCH_LIMIT,
        }
        async with transaction(self.engine) as connection:
            result = await connection.exec_driver_sql(_STALE_JOBS, params)
            job_ids = [str(row[0]) for row in result]
        if job_ids:
            log.warning(
                "sending the tasks of jobs that lost theirs again",
                extra={"jobs": job_ids},
            )
        return job_ids

    async def _send_again(self, job_ids: list[str]) -> None:
        if job_ids:
            await self._send(
                [
                    {"job_id": job_id, "task_id": str(uuid4()), "eta": None}
                    for job_id in job_ids
                ]
            )

    async def end_hung_runs(self) -> list[str]:
        """Terminate the sessions of runs that hold their job's lock long past
        its end; the ids of their jobs."""
        params = {
            "after": timedelta(seconds=self.hung_after_s),
            "sweep_key": REDISPATCH_LOCK_KEY,
            "limit": REDISPATCH_LIMIT,
        }
        async with transaction(self.engine) as connection:
            rows: list[Any] = list(await connection.exec_driver_sql(_HUNG_RUNS, params))
        job_ids = [str(row[0]) for row in rows]
        if rows:
            log.warning(
                "ended the database sessions of job runs hung past their end",
                extra={"jobs": job_ids, "backends": [row[1] for row in rows]},
            )
        return job_ids

    async def _save(self, position: LogPosition) -> None:
        async with transaction(self.engine) as connection:
            current = await checkpoint_in(connection)
            if position > current:
                await save_checkpoint(connection, CHECKPOINT, position)
            self._position = self._saved = max(position, current)
        self._saved_at = time.monotonic()

    async def _send(self, tasks: list[dict[str, Any]]) -> None:
        await self.sender.send(tasks)
        self.dispatched += len(tasks)


async def checkpoint_in(connection: Any) -> LogPosition:
    """The dispatcher's checkpoint, locked until the transaction ends."""
    position = await read_checkpoint(connection, CHECKPOINT, for_update=True)
    return position or LogPosition(0, 0)


def _task_for(envelope: dict[str, Any]) -> dict[str, Any]:
    """The Celery task an event asks for: run its job, now or at the retry time."""
    eta = None
    if envelope["type"] == "JobRetryScheduled":
        eta = datetime.fromisoformat(envelope["data"]["retry_at"])
    return {
        "job_id": envelope["stream_id"].removeprefix("job-"),
        "task_id": envelope["event_id"],
        "eta": eta,
    }


async def run_dispatcher(settings: Settings, stopping: asyncio.Event) -> None:
    engine = create_engine(settings, pool_size=POOL_SIZE, durable=False)
    try:
        await Dispatcher(settings, engine).run(stopping)
    finally:
        await engine.dispose()
