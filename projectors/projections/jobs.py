"""The jobs read model: `job_statuses`, one row a job, as GET /jobs shows it.

Events are applied a batch at a time: the rows of the batch's jobs are read once,
each job's events are folded onto its row in Python, in log order, and the changed
rows are written back in one statement. An event at or below a row's `version` is
skipped, so a replayed or duplicated event changes nothing. A job whose status
changed gets a NOTIFY on `helix_jobs` (payload: the job id), sent at commit: the
query API answers `GET /jobs/{id}?wait=S` the moment its job finishes instead of
polling for it.
"""

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg.rows import dict_row

from projectors.framework import Projection, ProjectionTx
from shared.db import driver_connection
from shared.event_store import RecordedEvent
from shared.jobs.state import job_changes

JOBS_CHANNEL = "helix_jobs"

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

Row = dict[str, Any]


def _job_id(event: RecordedEvent) -> str:
    return str(UUID(event.stream_id.removeprefix("job-")))


def submitted_row(event: RecordedEvent) -> Row:
    data = event.data
    return {
        "id": _job_id(event),
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
    table = tx.table("job_statuses")
    job_ids = list(dict.fromkeys(_job_id(event) for event in events))
    driver = await driver_connection(tx.connection)
    cursor = driver.cursor(row_factory=dict_row)
    await cursor.execute(
        f"SELECT {', '.join(COLUMNS)} FROM {table} WHERE id = ANY(%s::uuid[])",
        (job_ids,),
    )
    rows: dict[str, Row] = {str(row["id"]): row for row in await cursor.fetchall()}

    changed: dict[str, Row] = {}
    woken: set[str] = set()
    for event in events:
        job_id = _job_id(event)
        row = rows.get(job_id)
        if event.type == "JobSubmitted":
            if row is not None:
                continue
            new_row = submitted_row(event)
        elif row is None or event.version <= row["version"]:
            continue
        else:
            new_row = apply_event(row, event)
        if row is None or new_row["status"] != row["status"]:
            woken.add(job_id)
        rows[job_id] = changed[job_id] = new_row
    if not changed:
        return

    updates = ", ".join(f"{name} = excluded.{name}" for name in COLUMNS if name != "id")
    # The rows and the wake-ups in one statement: one round trip a batch.
    await driver.execute(
        f"WITH written AS (INSERT INTO {table} ({', '.join(COLUMNS)})"
        f" SELECT {', '.join(COLUMNS)}"
        f" FROM jsonb_populate_recordset(NULL::{table}, %s::jsonb)"
        f" ON CONFLICT (id) DO UPDATE SET {updates} RETURNING id)"
        " SELECT count(*) FROM written"
        " UNION ALL SELECT count(pg_notify(%s, job_id))"
        " FROM unnest(%s::text[]) AS job_id",
        (
            json.dumps(list(changed.values()), default=_json_value),
            JOBS_CHANNEL,
            sorted(woken),
        ),
    )


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in job_statuses")
