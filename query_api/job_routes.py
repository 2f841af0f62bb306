"""Job reads: the jobs projection (`job_statuses`)."""

import asyncio
import contextlib
import time
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from psycopg.rows import dict_row
from sqlalchemy.ext.asyncio import AsyncEngine

from query_api.consistency import consistent_read
from query_api.dependencies import CurrentUser, Engine
from query_api.job_waits import JobWaits
from shared.auth import Principal
from shared.db import fetch, snapshot
from shared.errors import NotFound
from shared.inputs import Offset
from shared.jobs.state import TERMINAL_STATUSES, JobStatus
from shared.jobs.views import JobList, JobOut
from shared.responses import documented

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

# Read-your-writes on the jobs projection: waits for a sent Helix-Position.
JobsFresh = Annotated[None, Depends(consistent_read("jobs"))]

MAX_PAGE = 500
MAX_WAIT_S = 30.0
_COLUMNS = (
    "id, task, status, result_data, message, progress, attempts, owner_id,"
    " submitted_at, started_at, finished_at"
)


def _waits(request: Request) -> JobWaits:
    waits: JobWaits = request.app.state.job_waits
    return waits


async def _read_job(
    engine: AsyncEngine, job_id: UUID, principal: Principal
) -> dict[str, Any] | None:
    """The job, or None if there is none that `principal` may see.

    Another user's job is None like a missing one, for a wait as well: waiting
    it out like a missing job tells no one that it exists.
    """
    rows = await fetch(
        engine,
        f"SELECT {_COLUMNS} FROM job_statuses WHERE id = %(id)s",
        {"id": job_id},
        row_factory=dict_row,
    )
    row: dict[str, Any] | None = rows[0] if rows else None
    return row if row and principal.may_act_on(row["owner_id"]) else None


@router.get(
    "/{job_id}", response_model=JobOut, responses=documented(200, errors=(401, 404))
)
async def read_job(
    job_id: UUID,
    request: Request,
    engine: Engine,
    principal: CurrentUser,
    fresh: JobsFresh,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
) -> Any:
    """A job (owner or superuser); `wait=S` answers once it finishes, or after S s."""
    deadline = time.monotonic() + wait
    if not wait:
        row = await _read_job(engine, job_id, principal)
    else:
        # Watch, and clear the wake-up, before each look: a change that lands
        # between the look and the wait still wakes us.
        waits = _waits(request)
        with waits.watch(job_id) as woken:
            while True:
                woken.clear()
                row = await _read_job(engine, job_id, principal)
                remaining = deadline - time.monotonic()
                done = row is not None and row["status"] in TERMINAL_STATUSES
                if done or remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        woken.wait(), min(remaining, waits.recheck_s)
                    )
    if row is None:
        raise NotFound("job not found")

    return row


@router.get("/", response_model=JobList, responses=documented(200, errors=(401, 403)))
async def list_jobs(
    engine: Engine,
    principal: CurrentUser,
    fresh: JobsFresh,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    status: Annotated[JobStatus | None, Query()] = None,
    owner_id: Annotated[UUID | None, Query()] = None,
) -> JobList:
    """Your jobs, newest first; a superuser sees everyone's, or `owner_id`'s."""
    if owner_id is not None and not principal.may_act_on(owner_id):
        raise HTTPException(403, "only a superuser may list other users' jobs")
    if not principal.is_superuser:
        owner_id = principal.user_id
    filters: list[str] = []
    params: dict[str, object] = {"offset": offset, "limit": limit}
    if owner_id is not None:
        filters.append("owner_id = %(owner_id)s")
        params["owner_id"] = owner_id
    if status is not None:
        filters.append("status = %(status)s")
        params["status"] = status
    where = f"WHERE {' AND '.join(filters)}" if filters else ""
    async with snapshot(engine) as connection:
        total = await connection.exec_driver_sql(
            f"SELECT count(*) FROM job_statuses {where}", params
        )
        rows = await connection.exec_driver_sql(
            f"SELECT {_COLUMNS} FROM job_statuses {where}"
            " ORDER BY submitted_at DESC, id DESC OFFSET %(offset)s LIMIT %(limit)s",
            params,
        )
        items = [JobOut.model_validate(dict(row)) for row in rows.mappings()]

    return JobList(items=items, total=total.scalar_one())
