"""The jobs read model: `job_statuses`, one row a job, as GET /jobs shows it.

Events are applied a batch at a time: the rows of the batch's jobs are read once,
each job's events are folded onto its row in Python, in log order, and the changed
rows are written back in one statement. An event at or below a row's `version` is
skipped, so a replayed or duplicated event changes nothing. A job whose status
changed gets a NOTIFY on `helix_jobs` (payload: the job id), sent at commit: the
query API answers `GET /jobs/{id}?wait=S` the moment its job finishes instead of
polling for it.
"""

from collections.abc import Sequence

from projectors.framework import (
    Projection,
    ProjectionTx,
    Row,
    entity_id,
    fold_onto_rows,
    rows_json,
)
from shared.db import driver_connection
from shared.event_store import RecordedEvent
from shared.jobs.state import job_changes
from shared.log_listener import JOBS_CHANNEL

COLUMNS = {
    "id": "uuid PRIMARY KEY",
    "owner_id": "uuid NOT NULL",
    "task": "text NOT NULL",
    "status": "text NOT NULL",
    "result_data": "jsonb",
    "message": "text",
    "progress": "double precision NOT NULL DEFAULT 0",
    "attempts": "integer NOT NULL DEFAULT 0",
    "max_retries": "integer NOT NULL",
    "timeout_s": "double precision NOT NULL",
    "cancel_requested": "boolean NOT NULL DEFAULT false",
    "submitted_at": "timestamptz NOT NULL",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "retry_at": "timestamptz",
    "version": "integer NOT NULL",
    "updated_at": "timestamptz NOT NULL",
}

projection = Projection(
    name="jobs",
    tables={
        "job_statuses": ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
    },
    indexes={
        "job_statuses": [
            "owner_id, submitted_at",
            "submitted_at",
            "status, submitted_at",
        ]
    },
)


def submitted_row(event: RecordedEvent) -> Row:
    data = event.data
    return {
        "id": entity_id(event),
        "owner_id": str(data["owner_id"]),
        "task": data["task"],
        "status": "PENDING",
        "result_data": None,
        "message": None,
        "progress": 0.0,
        "attempts": 0,
        "max_retries": data["max_retries"],
        "timeout_s": data["timeout_s"],
        "cancel_requested": False,
        "submitted_at": event.recorded_at,
        "started_at": None,
        "finished_at": None,
        "retry_at": None,
        "version": event.version,
        "updated_at": event.recorded_at,
    }


def apply_event(row: Row, event: RecordedEvent) -> Row:
    """The row after `event`, which is newer than the row (a pure function)."""
    return {
        **row,
        "version": event.version,
        "updated_at": event.recorded_at,
        **job_changes(event),
    }


@projection.handles_batch(
    "JobSubmitted",
    "JobStarted",
    "JobProgressed",
    "JobRetryScheduled",
    "JobSucceeded",
    "JobFailed",
    "JobCancelRequested",
    "JobCancelled",
)
async def apply_job_events(tx: ProjectionTx, events: Sequence[RecordedEvent]) -> None:
    job_ids = list(dict.fromkeys(entity_id(event) for event in events))
    rows = await tx.rows_by_id("job_statuses", list(COLUMNS), job_ids)

    before = {job_id: row["status"] for job_id, row in rows.items()}
    changed = fold_onto_rows(
        rows,
        events,
        row_id=entity_id,
        created_by="JobSubmitted",
        new_row=submitted_row,
        next_row=apply_event,
        version="version",
    )
    if not changed:
        return
    woken = [
        job_id for job_id, row in changed.items() if before.get(job_id) != row["status"]
    ]

    # The rows and the wake-ups in one statement: one round trip a batch.
    driver = await driver_connection(tx.connection)
    await driver.execute(
        f"WITH written AS ({tx.upsert_sql('job_statuses', list(COLUMNS))}"
        " RETURNING id)"
        " SELECT count(*) FROM written"
        " UNION ALL SELECT count(pg_notify(%s, job_id))"
        " FROM unnest(%s::text[]) AS job_id",
        (rows_json(list(changed.values())), JOBS_CHANNEL, sorted(woken)),
    )
