"""History of one user or job, and the audit trail: the log itself, read back.

These read the `events` table, not a projection. A stream's history shows a
command's events as soon as they commit; the audit, read below the log's read
horizon, may trail for a moment. A `Helix-Position` sent with either waits until
they show it (for a history, until the event is there: on a standby, replayed).
Pages are cursored by the global position of the last item (`after` /
`next_after`). Personal data inside user events is decrypted with the user's key,
or shown as erased.

One stream's history is ordered by position. The audit is ordered as the log is
read, by (transaction_id, position): positions commit out of order, and a client
that tails the audit by `next_after` would otherwise miss an event whose
transaction was still open when it read the page before.
"""

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from query_api.dependencies import (
    CurrentUser,
    Engine,
    LogFresh,
    StreamFresh,
    Superuser,
)
from shared import pii
from shared.db import connect
from shared.errors import UnknownEventType
from shared.events import registry
from shared.inputs import MAX_BIGINT, StoredText
from shared.jobs.state import job_stream
from shared.responses import documented
from shared.users import user_id_of, user_stream
from shared.web import validation_error

router = APIRouter(prefix="/api/v1", tags=["history"])

MAX_PAGE = 500
DEFAULT_PAGE = 100
# The audit reads only below the oldest open transaction, as log readers do. One
# stream's history needs no horizon: its versions commit in order (each append
# names the version before it), so paging by position never passes a gap, and a
# client sees its own command's events at once.
_HORIZON = "transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
_SELECT = (
    "SELECT position, stream_id, version, type, schema_version, data, metadata,"
    " recorded_at FROM events"
)

After = Annotated[
    int,
    Query(ge=0, le=MAX_BIGINT, description="return events after this position"),
]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]


class HistoryItem(BaseModel):
    position: int
    stream_id: str
    version: int
    type: str
    recorded_at: datetime
    actor_id: UUID | None
    correlation_id: str | None
    data: dict[str, Any]


class HistoryPage(BaseModel):
    items: list[HistoryItem]
    next_after: int | None


def _current_data(event_type: str, schema_version: int, data: Any) -> Any:
    try:
        registered = registry.get(event_type)
    except UnknownEventType:
        return data
    if schema_version < registered.version:
        return registered.upcast(data, schema_version)
    return data


async def _page(
    connection: AsyncConnection,
    filters: list[str],
    params: dict[str, Any],
    limit: int,
    *,
    log_order: bool = False,
) -> HistoryPage:
    """One page by position, or in log order below the horizon."""
    conditions = [_HORIZON, *filters] if log_order else filters
    order = "transaction_id, position" if log_order else "position"
    sql = (
        f"{_SELECT} WHERE {' AND '.join(conditions)}"
        f" ORDER BY {order} LIMIT {int(limit)}"
    )
    rows = list((await connection.exec_driver_sql(sql, params)).all())
    owners = {row.position: user_id_of(row.stream_id) for row in rows}
    keys = await pii.load_keys(connection, [u for u in owners.values() if u])
    items = []
    for row in rows:
        owner = owners[row.position]
        data = _current_data(row.type, row.schema_version, row.data)
        if owner is not None:
            data = pii.reveal(row.type, data, keys.get(owner))
        items.append(
            HistoryItem(
                position=row.position,
                stream_id=row.stream_id,
                version=row.version,
                type=row.type,
                recorded_at=row.recorded_at,
                actor_id=row.metadata.get("actor_id"),
                correlation_id=row.metadata.get("correlation_id"),
                data=data,
            )
        )
    full = len(items) == limit
    return HistoryPage(items=items, next_after=items[-1].position if full else None)


async def _stream_page(
    connection: AsyncConnection, stream_id: str, after: int, limit: int
) -> HistoryPage:
    """One stream's events after position `after`, in position order."""
    filters = ["stream_id = %(stream_id)s", "position > %(after)s"]
    params = {"stream_id": stream_id, "after": after}
    return await _page(connection, filters, params, limit)


@router.get(
    "/users/{user_id}/history",
    response_model=HistoryPage,
    responses=documented(200, errors=(401, 404)),
)
async def user_history(
    user_id: UUID,
    engine: Engine,
    principal: CurrentUser,
    fresh: StreamFresh,
    after: After = 0,
    limit: Limit = DEFAULT_PAGE,
) -> HistoryPage:
    """Every event of one user's stream (self or superuser)."""
    if not principal.may_act_on(user_id):
        raise HTTPException(404, "user not found")
    stream_id = user_stream(user_id)
    async with connect(engine) as connection:
        page = await _stream_page(connection, stream_id, after, limit)
        if not page.items and not await _stream_exists(connection, stream_id):
            raise HTTPException(404, "user not found")
    return page


async def _stream_exists(connection: AsyncConnection, stream_id: str) -> bool:
    result = await connection.exec_driver_sql(
        "SELECT EXISTS (SELECT 1 FROM events WHERE stream_id = %s)", (stream_id,)
    )
    return bool(result.scalar_one())


@router.get(
    "/jobs/{job_id}/history",
    response_model=HistoryPage,
    responses=documented(200, errors=(401, 404)),
)
async def job_history(
    job_id: UUID,
    engine: Engine,
    principal: CurrentUser,
    fresh: StreamFresh,
    after: After = 0,
    limit: Limit = DEFAULT_PAGE,
) -> HistoryPage:
    """Every event of one job's stream (owner or superuser)."""
    stream_id = job_stream(job_id)
    async with connect(engine) as connection:
        # The owner as the log has it, so this never waits on the jobs projection.
        result = await connection.exec_driver_sql(
            "SELECT data->>'owner_id' FROM events"
            " WHERE stream_id = %(stream_id)s AND type = 'JobSubmitted'",
            {"stream_id": stream_id},
        )
        owner = result.scalar_one_or_none()
        if owner is None or not (
            principal.is_superuser or owner == str(principal.user_id)
        ):
            raise HTTPException(404, "job not found")
        return await _stream_page(connection, stream_id, after, limit)


@router.get(
    "/audit", response_model=HistoryPage, responses=documented(200, errors=(401, 403))
)
async def audit(
    engine: Engine,
    principal: Superuser,
    fresh: LogFresh,
    stream: Annotated[StoredText | None, Query(max_length=200)] = None,
    category: Annotated[StoredText | None, Query(max_length=50)] = None,
    event_types: Annotated[list[StoredText] | None, Query(alias="type")] = None,
    actor_id: UUID | None = None,
    correlation_id: Annotated[StoredText | None, Query(max_length=200)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after: After = 0,
    limit: Limit = DEFAULT_PAGE,
) -> HistoryPage:
    """The whole log, filtered: who did what, when (superuser)."""
    filters: list[str] = []
    params: dict[str, Any] = {}
    if stream is not None:
        filters.append("stream_id = %(stream)s")
        params["stream"] = stream
    if category is not None:
        filters.append("category = %(category)s")
        params["category"] = category
    if event_types:
        filters.append("type = ANY(%(types)s)")
        params["types"] = event_types
    if actor_id is not None:
        filters.append("metadata->>'actor_id' = %(actor_id)s")
        params["actor_id"] = str(actor_id)
    if correlation_id is not None:
        filters.append("metadata->>'correlation_id' = %(correlation_id)s")
        params["correlation_id"] = correlation_id
    if since is not None:
        filters.append("recorded_at >= %(since)s")
        params["since"] = since
    if until is not None:
        filters.append("recorded_at < %(until)s")
        params["until"] = until
    async with connect(engine) as connection:
        if after:
            filters.append(
                "(transaction_id, position) > (%(after_xid)s::xid8, %(after)s)"
            )
            params["after_xid"] = await _transaction_of(connection, after)
            params["after"] = after
        return await _page(connection, filters, params, limit, log_order=True)


async def _transaction_of(connection: AsyncConnection, position: int) -> str:
    """Where the audit resumes after `position`: that event's place in log order."""
    result = await connection.exec_driver_sql(
        "SELECT transaction_id::text FROM events WHERE position = %(position)s",
        {"position": position},
    )
    transaction_id = result.scalar_one_or_none()
    if transaction_id is None:
        raise validation_error(
            ("query", "after"), "after must be a position returned by a previous page"
        )
    return str(transaction_id)
