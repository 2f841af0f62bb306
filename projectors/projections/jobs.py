"""The jobs read model: `job_statuses`, one row a job, as GET /jobs shows it.

Every update applies only if the event is newer than the row's `version`, so a
replayed or duplicated event changes nothing. A change of status also sends
NOTIFY on `helix_jobs` with the job id, at commit: the query API answers
`GET /jobs/{id}?wait=S` the moment its job finishes instead of polling for it.
"""

import json
from typing import Any
from uuid import UUID

from projectors.framework import Projection, ProjectionTx
from shared.event_store import RecordedEvent

JOBS_CHANNEL = "helix_jobs"

projection = Projection(
    name="jobs",
    tables={
        "job_statuses": (
            "id uuid PRIMARY KEY,"
            " owner_id uuid NOT NULL,"
            " task text NOT NULL,"
            " status text NOT NULL,"
            " result_data jsonb,"
            " message text,"
            " progress double precision NOT NULL DEFAULT 0,"
            " attempts integer NOT NULL DEFAULT 0,"
            " max_retries integer NOT NULL,"
            " timeout_s double precision NOT NULL,"
            " cancel_requested boolean NOT NULL DEFAULT false,"
            " submitted_at timestamptz NOT NULL,"
            " started_at timestamptz,"
            " finished_at timestamptz,"
            " retry_at timestamptz,"
            " version integer NOT NULL,"
            " updated_at timestamptz NOT NULL"
        )
    },
    indexes={
        "job_statuses": [
            "owner_id, submitted_at",
            "submitted_at",
            "status, submitted_at",
        ]
    },
)


def _job_id(event: RecordedEvent) -> UUID:
    return UUID(event.stream_id.removeprefix("job-"))


async def _update(
    tx: ProjectionTx,
    event: RecordedEvent,
    assignments: str,
    values: dict[str, Any] | None = None,
    *,
    notify: bool = True,
) -> None:
    update = (
        f"UPDATE {tx.table('job_statuses')}"
        f" SET {assignments}, version = %(version)s, updated_at = %(recorded_at)s"
        " WHERE id = %(id)s AND version < %(version)s"
    )
    if notify:
        update = _NOTIFY_CHANGED.format(change=update + " RETURNING id")
    await tx.connection.exec_driver_sql(
        update,
        {
            **(values or {}),
            "id": _job_id(event),
            "version": event.version,
            "recorded_at": event.recorded_at,
            "channel": JOBS_CHANNEL,
        },
    )


# Sent at commit, and only for a row the statement changed.
_NOTIFY_CHANGED = (
    "WITH changed AS ({change}) SELECT pg_notify(%(channel)s, id::text) FROM changed"
)


@projection.handles("JobSubmitted")
async def add_job(tx: ProjectionTx, event: RecordedEvent) -> None:
    data = event.data
    insert = (
        f"INSERT INTO {tx.table('job_statuses')}"
        " (id, owner_id, task, status, max_retries, timeout_s, submitted_at,"
        " version, updated_at)"
        " VALUES (%(id)s, %(owner_id)s, %(task)s, 'PENDING', %(max_retries)s,"
        " %(timeout_s)s, %(recorded_at)s, %(version)s, %(recorded_at)s)"
        " ON CONFLICT (id) DO NOTHING RETURNING id"
    )
    await tx.connection.exec_driver_sql(
        _NOTIFY_CHANGED.format(change=insert),
        {
            "id": _job_id(event),
            "owner_id": data["owner_id"],
            "task": data["task"],
            "max_retries": data["max_retries"],
            "timeout_s": data["timeout_s"],
            "recorded_at": event.recorded_at,
            "version": event.version,
            "channel": JOBS_CHANNEL,
        },
    )


@projection.handles("JobStarted")
async def mark_job_started(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(
        tx,
        event,
        "status = 'STARTED', attempts = %(attempt)s, started_at = %(recorded_at)s,"
        " progress = 0, retry_at = NULL",
        {"attempt": event.data["attempt"]},
    )


@projection.handles("JobProgressed")
async def record_job_progress(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(
        tx,
        event,
        "progress = %(progress)s",
        {"progress": event.data["progress"]},
        notify=False,
    )


@projection.handles("JobRetryScheduled")
async def mark_job_retrying(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(
        tx,
        event,
        "status = 'RETRY', message = %(message)s, retry_at = %(retry_at)s",
        {"message": event.data["message"], "retry_at": event.data["retry_at"]},
    )


@projection.handles("JobSucceeded")
async def mark_job_succeeded(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(
        tx,
        event,
        "status = 'SUCCESS', result_data = %(result)s::jsonb, message = NULL,"
        " progress = 1, finished_at = %(recorded_at)s",
        {"result": json.dumps(event.data["result_data"])},
    )


@projection.handles("JobFailed")
async def mark_job_failed(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(
        tx,
        event,
        "status = 'FAILURE', message = %(message)s, finished_at = %(recorded_at)s,"
        " retry_at = NULL",
        {"message": event.data["message"]},
    )


@projection.handles("JobCancelRequested")
async def mark_job_cancel_requested(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(tx, event, "cancel_requested = true", notify=False)


@projection.handles("JobCancelled")
async def mark_job_cancelled(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(
        tx,
        event,
        "status = 'REVOKED', message = 'cancelled', finished_at = %(recorded_at)s,"
        " retry_at = NULL",
    )
