"""Runs one delivery of a job: decide from the job stream, run the handler, record.

Every delivery of a job's task comes here, however many there are. The runner
first takes a PostgreSQL advisory lock named after the job, on a session of its
own, and holds it until the job's outcome is appended; it reads and appends on
that session (in autocommit, each append its own transaction), so it never
writes without holding the lock:

- lock taken by someone else: another worker runs this job right now, so this
  delivery is a duplicate and does nothing;
- job already SUCCESS, FAILURE or REVOKED: nothing to do;
- cancel requested: append JobCancelled, never run;
- PENDING, or RETRY and due: append JobStarted with the stream's version (so a
  racing cancel or a second delivery loses cleanly), then run;
- STARTED although the lock was free: the run was lost (its worker died, or
  lost its session, which freed the lock). This delivery takes over as a new
  attempt: a lost run is the platform's failure, not the job's, so it spends
  none of `max_retries`, but a job whose runs are lost more than MAX_LOST_RUNS
  times (one that kills its worker, say) fails.

A handler that is done within QUICK_S (echo, a checksum) gets its JobStarted and
its terminal event in one append, at the version the decision was made on: one
commit instead of two, and still nobody else could have started the job. Any
longer, and JobStarted is appended while the handler goes on running.

While the handler runs in a thread, the runner watches the job stream for a
cancel, enforces `timeout_s`, and appends JobProgressed at most twice a second,
for a change of 1 % or more.
A look at the stream that gets no answer within WATCH_READ_TIMEOUT_S (the
database stalled) stops the handler and gives the delivery back: the session,
and with it the lock, is abandoned, never waited on.
Exactly one terminal event ends the attempt, appended at the version the runner
last saw; a conflicting append is re-read and re-decided, never duplicated.
"""

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import connect, driver_connection
from shared.errors import (
    HelixError,
    InvalidEventData,
    NotFound,
    StoreUnavailable,
    WrongExpectedVersion,
)
from shared.event_store import EventMetadata, EventStore
from shared.events.job import (
    JobCancelled,
    JobFailed,
    JobProgressed,
    JobRetryScheduled,
    JobStarted,
    JobSucceeded,
)
from shared.events.registry import DomainEvent
from shared.jobs import (
    JobCatalog,
    JobContext,
    JobError,
    JobInterrupted,
    RetryableJobError,
    UnknownTask,
)
from shared.jobs.retries import retry_delay_s
from shared.jobs.state import JobState, job_lock_key, job_stream
from shared.settings import Settings

log = logging.getLogger(__name__)

Outcome = Literal[
    "busy", "finished", "not_due", "cancelled", "succeeded", "failed", "retrying"
]
WATCH_INTERVAL_S = 0.2
PROGRESS_INTERVAL_S = 0.5
# The least change of progress worth an event (1 %), unless it reaches 100 %.
PROGRESS_STEP = 0.01
STOP_GRACE_S = 0.5
# A retry may be delivered a moment early (clocks, broker timers).
EARLY_RETRY_TOLERANCE = timedelta(milliseconds=100)
MAX_CONFLICTS = 20
# A handler done within this long has its start and end appended together.
QUICK_S = 0.05
# Runs of one job that may be lost (and taken over) before the job fails.
MAX_LOST_RUNS = 3
WATCH_READ_TIMEOUT_S = 10.0


class SessionLost(StoreUnavailable):
    """The job's session stopped answering; it holds the job's lock no more."""


@dataclass
class _Ending:
    """How an attempt ended, before it is written down."""

    result: dict[str, Any] | None = None
    error: BaseException | None = None
    cancelled: bool = False
    timed_out: bool = False


class JobRunner:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        store: EventStore,
        catalog: JobCatalog,
        settings: Settings,
        worker_name: str | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.catalog = catalog
        self.settings = settings
        self.worker_name = worker_name or f"{socket.gethostname()}/{os.getpid()}"
        self.executor = executor or ThreadPoolExecutor(thread_name_prefix="job")

    async def run(self, job_id: UUID) -> Outcome:
        """Handle one delivery of job `job_id`; see the module docstring."""
        stream = job_stream(job_id)
        async with self._job_lock(stream) as session:
            if session is None:
                log.info("job is running elsewhere", extra={"job_id": str(job_id)})
                return "busy"
            return await self._run_locked(stream, session)

    async def _run_locked(self, stream: str, session: AsyncConnection) -> Outcome:
        for _ in range(MAX_CONFLICTS):
            # Read on the session that holds the lock: no second connection.
            state = await self._load(stream, session)
            if state.terminal:
                return "finished"
            if state.cancel_requested:
                cancelled = JobCancelled(attempt=state.attempts)
                if await self._try_append(session, state, cancelled) is not None:
                    return "cancelled"
                continue
            if (
                state.status == "RETRY"
                and state.retry_at is not None
                and datetime.now(UTC) + EARLY_RETRY_TOLERANCE < state.retry_at
            ):
                return "not_due"
            attempt = state.attempts + 1
            if state.status == "STARTED":
                ended = self._lost_run_ending(state)
                if ended is not None:
                    if await self._try_append(session, state, ended) is not None:
                        self._log_ending(state, state.attempts, "failed", ended, None)
                        return "failed"
                    continue
                log.warning(
                    "job run lost, taking it over",
                    extra={"job_id": str(state.id), "attempt": attempt},
                )
            started = JobStarted(attempt=attempt, worker=self.worker_name)
            outcome = await self._attempt(session, state, started)
            if outcome is not None:
                return outcome
        raise WrongExpectedVersion(stream, None, -1)

    def _lost_run_ending(self, state: JobState) -> JobFailed | None:
        """How a job whose run was lost ends, or None if it is run again (with
        a timeout of its own, however long ago the lost run started)."""
        lost = state.lost_runs + 1
        if lost > MAX_LOST_RUNS:
            message = f"the worker running the job was lost ({lost} times)"
            return JobFailed(
                attempt=state.attempts, message=message, kind="worker_lost"
            )
        return None

    async def _attempt(
        self, session: AsyncConnection, state: JobState, started: JobStarted
    ) -> Outcome | None:
        """Run one attempt; None if the stream moved before it could start."""
        attempt = started.attempt
        context = JobContext()
        try:
            task_type = self.catalog.get(state.task)
        except UnknownTask as exc:
            ending = _Ending(error=JobError(str(exc)))
            return await self._finish_quick(session, state, started, ending)
        future = asyncio.get_running_loop().run_in_executor(
            self.executor, task_type.run, state.payload, context
        )
        future.add_done_callback(_retrieve_outcome)
        done, _ = await asyncio.wait({future}, timeout=min(QUICK_S, state.timeout_s))
        if done:
            return await self._finish_quick(session, state, started, _ended(future))

        try:
            version = await self._try_append(session, state, started)
            if version is None:
                # A cancel came in before the start was recorded: decide again.
                context.stop("cancelled")
                return None
            state = state.started(attempt, version=version)
            log.info(
                "job started",
                extra={"job_id": str(state.id), "task": state.task, "attempt": attempt},
            )
            ending, state = await self._watch(session, state, future, context)
        except BaseException:
            # The store went away mid-run: this delivery will be tried again, so
            # the handler must not go on running beside the next attempt.
            context.stop("the worker lost its connection to the store")
            raise
        return await self._finish(session, state, attempt, ending)

    async def _finish_quick(
        self,
        session: AsyncConnection,
        state: JobState,
        started: JobStarted,
        ending: _Ending,
    ) -> Outcome | None:
        """Record a handler that ended at once: its start and end in one append.

        Only this runner can append JobStarted while it holds the job's lock, so
        the start is still recorded at the version the decision was made on; a
        cancel appended meanwhile makes the append fail, the result is dropped,
        and the job is decided again (it is then finished or cancelled).
        """
        running = state.started(started.attempt)
        outcome, event = self._decide(running, started.attempt, ending)
        try:
            version = await self._try_append(session, state, started, event)
        except InvalidEventData as exc:
            event = JobFailed(attempt=started.attempt, message=f"invalid result: {exc}")
            version = await self._try_append(session, state, started, event)
            outcome = "failed"
        if version is None:
            return None
        self._log_ending(state, started.attempt, outcome, event, ending.error)
        return outcome

    async def _watch(
        self,
        session: AsyncConnection,
        state: JobState,
        future: "asyncio.Future[Any]",
        context: JobContext,
    ) -> tuple[_Ending, JobState]:
        """Wait for a running handler: stop it on cancel or timeout, record progress."""
        ending = _Ending()
        deadline = time.monotonic() + state.timeout_s
        stop_deadline: float | None = None
        last_progress = 0.0
        recorded = state.progress
        unrecorded: float | None = None
        while True:
            done, _ = await asyncio.wait({future}, timeout=WATCH_INTERVAL_S)
            if done:
                break
            now = time.monotonic()
            if stop_deadline is not None:
                if now >= stop_deadline:
                    # The handler ignores its stop; its result will be ignored too.
                    self._abandon_handler(state)
                    break
                continue
            state = await self._refresh_within(session, state)
            if state.cancel_requested:
                ending.cancelled = True
            elif now >= deadline:
                ending.timed_out = True
            if ending.cancelled or ending.timed_out:
                context.stop("cancelled" if ending.cancelled else "timed out")
                stop_deadline = now + STOP_GRACE_S
                continue
            if now - last_progress < PROGRESS_INTERVAL_S:
                # Too soon to record: what was reported waits for the next turn.
                continue
            reported = context.take_progress()
            if reported is not None:
                unrecorded = reported
            if unrecorded is not None and (
                abs(unrecorded - recorded) >= PROGRESS_STEP or unrecorded >= 1.0
            ):
                # Steps too small to show wait until they add up: the log keeps
                # every event for good, and an hour's job would leave thousands.
                last_progress, recorded, unrecorded = now, unrecorded, None
                event = JobProgressed(attempt=state.attempts, progress=recorded)
                await self._try_append(session, state, event)

        if future.done() and not (ending.cancelled or ending.timed_out):
            ending = _ended(future)

        return ending, state

    def _abandon_handler(self, state: JobState) -> None:
        """Leave a handler that ignored its stop to its thread, and give later
        jobs threads of their own: queued behind it, they would time out
        without ever having run."""
        log.warning(
            "job handler ignored its stop; its thread is left running",
            extra={"job_id": str(state.id), "task": state.task},
        )
        abandoned = self.executor
        self.executor = ThreadPoolExecutor(thread_name_prefix="job")
        abandoned.shutdown(wait=False)

    async def _finish(
        self, session: AsyncConnection, state: JobState, attempt: int, ending: _Ending
    ) -> Outcome:
        outcome, event = self._decide(state, attempt, ending)
        for _ in range(MAX_CONFLICTS):
            try:
                if await self._try_append(session, state, event) is not None:
                    break
            except InvalidEventData as exc:
                # A result that is not JSON cannot be stored: the job fails instead.
                outcome = "failed"
                event = JobFailed(attempt=attempt, message=f"invalid result: {exc}")
                continue
            state = await self._load(job_stream(state.id), session)
            if state.terminal:
                return "finished"
        self._log_ending(state, attempt, outcome, event, ending.error)
        return outcome

    def _decide(
        self, state: JobState, attempt: int, ending: _Ending
    ) -> tuple[Outcome, DomainEvent]:
        if ending.cancelled:
            return "cancelled", JobCancelled(attempt=attempt)
        if ending.timed_out:
            message = f"timed out after {state.timeout_s:g} s"
            return "failed", JobFailed(attempt=attempt, message=message, kind="timeout")
        if ending.result is not None:
            return "succeeded", JobSucceeded(attempt=attempt, result_data=ending.result)
        error = ending.error
        # Lost runs were the platform's failures: they spend no retries.
        retries_spent = attempt - 1 - state.lost_runs
        if self._retryable(state, error) and retries_spent < state.max_retries:
            delay = retry_delay_s(
                attempt,
                base_s=self.settings.job_retry_base_s,
                cap_s=self.settings.job_retry_cap_s,
            )
            retry = JobRetryScheduled(
                attempt=attempt,
                message=_message(error),
                delay_s=delay,
                retry_at=datetime.now(UTC) + timedelta(seconds=delay),
            )
            return "retrying", retry
        return "failed", JobFailed(attempt=attempt, message=_message(error))

    def _log_ending(
        self,
        state: JobState,
        attempt: int,
        outcome: Outcome,
        event: DomainEvent,
        error: BaseException | None,
    ) -> None:
        """One line for how an attempt ended, recorded as `event`.

        A failure is a warning that says why. An exception no rule of the
        catalog expects (not a JobError, nor in the task's `retry_on`) is a bug
        in the handler: an error, with its traceback.
        """
        fields: dict[str, Any] = {
            "job_id": str(state.id),
            "task": state.task,
            "attempt": attempt,
            "outcome": outcome,
        }
        if isinstance(event, JobRetryScheduled):
            fields.update(error=event.message, retry_in_s=round(event.delay_s, 3))
            text = "job attempt failed, to be retried"
        elif isinstance(event, JobFailed):
            fields.update(error=event.message, kind=event.kind)
            text = "job failed"
        else:
            log.info("job attempt ended", extra=fields)
            return
        if self._unexpected(state, error):
            log.error(text, exc_info=error, extra=fields)
        else:
            log.warning(text, extra=fields)

    def _unexpected(self, state: JobState, error: BaseException | None) -> bool:
        if error is None or isinstance(error, JobError | JobInterrupted):
            return False
        return not self._retryable(state, error)

    def _retryable(self, state: JobState, error: BaseException | None) -> bool:
        if isinstance(error, RetryableJobError):
            return True
        try:
            retry_on = self.catalog.get(state.task).retry_on
        except UnknownTask:
            return False
        return bool(retry_on) and isinstance(error, retry_on)

    async def _load(self, stream: str, session: AsyncConnection) -> JobState:
        events = await self.store.read_stream(stream, connection=session)
        return JobState.from_events(events)

    async def _refresh_within(
        self, session: AsyncConnection, state: JobState
    ) -> JobState:
        """`_refresh`, or SessionLost if the database does not answer in time.

        The read is cancelled but not waited for: cancelling a query on a
        stalled link can take as long again.
        """
        read = asyncio.ensure_future(self._refresh(session, state))
        done, _ = await asyncio.wait({read}, timeout=WATCH_READ_TIMEOUT_S)
        if not done:
            read.cancel()
            read.add_done_callback(_retrieve_outcome)
            raise SessionLost("the job store did not answer the worker")
        return read.result()

    async def _refresh(self, session: AsyncConnection, state: JobState) -> JobState:
        newer = await self.store.read_stream(
            job_stream(state.id), from_version=state.version + 1, connection=session
        )
        for recorded in newer:
            state = state.apply(recorded)
        return state

    async def _try_append(
        self, session: AsyncConnection, state: JobState, *events: DomainEvent
    ) -> int | None:
        """Append at the version in `state`, on the job's locked session (in
        autocommit: the append is its own transaction); the new version, or
        None if the stream moved meanwhile."""
        metadata = EventMetadata(
            source="workers",
            correlation_id=state.correlation_id,
            causation_id=state.submitted_event_id,
        )
        try:
            appended = await self.store.append(
                job_stream(state.id),
                list(events),
                expected_version=state.version,
                metadata=metadata,
                connection=session,
            )
        except WrongExpectedVersion:
            return None
        return appended.version

    @asynccontextmanager
    async def _job_lock(self, stream: str) -> AsyncIterator[AsyncConnection | None]:
        """The session holding the job's lock, or None if another one holds it.

        A session-level lock on an autocommit connection: it holds no snapshot
        and no transaction, so it never holds back the log's read horizon, and
        PostgreSQL frees it when the session ends, however the worker died.
        """
        key = f"SELECT pg_try_advisory_lock({job_lock_key('%s')})"
        unlock = f"SELECT pg_advisory_unlock({job_lock_key('%s')})"
        async with connect(self.engine) as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            driver = await driver_connection(connection)
            row = await (await driver.execute(key, (stream,))).fetchone()
            locked = bool(row and row[0])
            try:
                yield connection if locked else None
            except SessionLost:
                # Nothing more is said on a session that stopped answering: it
                # is dropped, and the lock goes with it on the server.
                locked = False
                await connection.invalidate()
                raise
            finally:
                if locked:
                    try:
                        await driver.execute(unlock, (stream,))
                    except Exception:
                        # Never hand a session that may still hold the lock back
                        # to the pool.
                        await connection.invalidate()
                        raise


def _retrieve_outcome(future: "asyncio.Future[Any]") -> None:
    """Mark a handler's outcome as seen. An attempt that ended without it (cancelled,
    timed out) leaves the handler to stop on its own, and asyncio would log its
    JobInterrupted as an error nobody retrieved."""
    if not future.cancelled():
        future.exception()


def _ended(future: "asyncio.Future[Any]") -> _Ending:
    try:
        return _Ending(result=future.result())
    except Exception as exc:
        return _Ending(error=exc)


def _message(error: BaseException | None) -> str:
    if isinstance(error, JobError):
        return error.message
    if isinstance(error, JobInterrupted):
        return f"interrupted: {error.reason}"
    if isinstance(error, HelixError | NotFound):
        return str(error)
    if error is None:
        return "the job ended without a result"
    return f"{type(error).__name__}: {error}"[:2000]
