"""The job commands: submit and cancel.

A submission appends JobSubmitted; with an Idempotency-Key, the key's row is
written in the same transaction, so a key names exactly one job for 24 hours, and
two racing requests with one key create one job (the second waits on the first's
row, then finds it). A cancel decides from the job stream and appends at the
version it read: a worker that starts the job at the same moment makes one of the
two appends fail, and the loser re-reads and decides again.
"""

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncEngine

from shared.auth import Principal
from shared.db import transaction
from shared.errors import Conflict, NotFound, WrongExpectedVersion
from shared.event_store import NO_STREAM, EventMetadata, EventStore
from shared.events.job import JobCancelled, JobCancelRequested, JobSubmitted
from shared.events.registry import DomainEvent
from shared.jobs.state import JobState, job_stream

log = logging.getLogger(__name__)

IDEMPOTENCY_WINDOW = "24 hours"
MAX_CONFLICTS = 5


class IdempotencyKeyReused(Conflict):
    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was already used for another request")


@dataclass(frozen=True, slots=True)
class Submission:
    task: str
    payload: dict[str, Any]
    max_retries: int
    timeout_s: float

    def digest(self) -> str:
        # A whole number of seconds as an int: 300 sent, 300.0 sent and the
        # default are one request (and hash as before strict types came in).
        timeout: float = float(self.timeout_s)
        if timeout.is_integer():
            timeout = int(timeout)
        canonical = json.dumps(
            [self.task, self.payload, self.max_retries, timeout],
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class JobResult:
    job: JobState
    position: int
    created: bool = True


# Take the key, or take it over once it is older than the window. No row back
# means the key is live and belongs to an earlier request.
_CLAIM_KEY = f"""
INSERT INTO job_idempotency_keys (owner_id, idempotency_key, job_id, request_digest)
VALUES (%(owner_id)s, %(key)s, %(job_id)s, %(digest)s)
ON CONFLICT (owner_id, idempotency_key) DO UPDATE
  SET job_id = excluded.job_id, request_digest = excluded.request_digest,
      created_at = now()
  WHERE job_idempotency_keys.created_at < now() - interval '{IDEMPOTENCY_WINDOW}'
RETURNING job_id
"""
_SWEEP_KEYS = f"""
DELETE FROM job_idempotency_keys
WHERE created_at < now() - interval '{IDEMPOTENCY_WINDOW}'
"""
_EXISTING_KEY = """
SELECT job_id, request_digest FROM job_idempotency_keys
WHERE owner_id = %(owner_id)s AND idempotency_key = %(key)s
"""


async def submit_job(
    *,
    store: EventStore,
    principal: Principal,
    submission: Submission,
    idempotency_key: str | None,
    correlation_id: str | None,
) -> JobResult:
    """Append JobSubmitted, or return the job an earlier use of the key made."""
    job_id = uuid4()
    event = JobSubmitted(
        owner_id=principal.user_id,
        task=submission.task,
        payload=submission.payload,
        max_retries=submission.max_retries,
        timeout_s=submission.timeout_s,
    )
    metadata = EventMetadata(
        source="command_api", actor_id=principal.user_id, correlation_id=correlation_id
    )
    key_params = {
        "owner_id": principal.user_id,
        "key": idempotency_key,
        "job_id": job_id,
        "digest": submission.digest(),
    }

    if idempotency_key is None:
        # One statement on its own: concurrent submissions share a commit.
        appended = await store.append(
            job_stream(job_id), [event], expected_version=NO_STREAM, metadata=metadata
        )
    else:
        async with transaction(store.engine) as connection:
            claimed = await connection.exec_driver_sql(_CLAIM_KEY, key_params)
            if claimed.first() is None:
                existing = await connection.exec_driver_sql(_EXISTING_KEY, key_params)
                row = existing.one()
                earlier_job_id, digest = row.job_id, row.request_digest
                if digest != key_params["digest"]:
                    raise IdempotencyKeyReused()
                earlier = await load_job(store, earlier_job_id)
                return JobResult(earlier, earlier.last_position, created=False)
            appended = await store.append(
                job_stream(job_id),
                [event],
                expected_version=NO_STREAM,
                metadata=metadata,
                connection=connection,
            )
    assert appended.recorded_at is not None  # a new stream: nothing stored before

    job = JobState(
        id=job_id,
        owner_id=principal.user_id,
        task=event.task,
        payload=event.payload,
        max_retries=event.max_retries,
        timeout_s=event.timeout_s,
        submitted_at=appended.recorded_at,
        last_position=appended.last_position,
    )
    log.info("job submitted", extra={"job_id": str(job_id), "task": event.task})
    return JobResult(job, appended.last_position)


async def cancel_job(
    *,
    store: EventStore,
    principal: Principal,
    job_id: UUID,
    correlation_id: str | None,
) -> JobResult:
    """Ask a job to stop: one that has not started ends REVOKED at once.

    Raises NotFound for another user's job and Conflict for a finished one.
    """
    metadata = EventMetadata(
        source="command_api", actor_id=principal.user_id, correlation_id=correlation_id
    )
    for _ in range(MAX_CONFLICTS):
        job = await load_job(store, job_id)
        if not principal.may_act_on(job.owner_id):
            raise NotFound("job not found")
        if job.terminal:
            raise Conflict(f"the job has already finished ({job.status})")
        events: list[DomainEvent]
        if job.status in ("PENDING", "RETRY"):
            events = [JobCancelRequested(), JobCancelled(attempt=job.attempts)]
        elif job.cancel_requested:
            return JobResult(job, job.last_position, created=False)
        else:
            events = [JobCancelRequested()]
        try:
            appended = await store.append(
                job_stream(job_id),
                events,
                expected_version=job.version,
                metadata=metadata,
            )
        except WrongExpectedVersion:
            continue
        log.info("job cancel requested", extra={"job_id": str(job_id)})
        return JobResult(await load_job(store, job_id), appended.last_position)
    raise Conflict("the job kept changing; try again")


async def load_job(store: EventStore, job_id: UUID) -> JobState:
    return JobState.from_events(await store.read_stream(job_stream(job_id)))


async def sweep_idempotency_keys(engine: AsyncEngine) -> int:
    """Delete the keys older than the window; how many went.

    An expired key is taken over when it is used again anyway: this only keeps
    the table from growing with keys nobody sends twice.
    """
    async with transaction(engine) as connection:
        result = await connection.exec_driver_sql(_SWEEP_KEYS)
    return int(result.rowcount)


async def sweep_idempotency_keys_every(engine: AsyncEngine, interval_s: float) -> None:
    """Sweep at start and then every `interval_s`, until cancelled.

    Every command API process runs it; the DELETEs of several at once are
    harmless. A sweep that fails (PostgreSQL away) is tried again next time.
    """
    while True:
        try:
            swept = await sweep_idempotency_keys(engine)
            if swept:
                log.info("expired idempotency keys deleted", extra={"count": swept})
        except Exception as exc:
            log.warning(
                "could not delete expired idempotency keys", extra={"error": str(exc)}
            )
        await asyncio.sleep(interval_s)
