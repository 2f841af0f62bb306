"""Projections: read tables built from the event log, and how they are applied.

A projection is one module in `projectors/projections/` defining a module-level
`projection`:

    projection = Projection(
        name="users",
        tables={"user_profiles": "id uuid PRIMARY KEY, email text, name text"},
        indexes={"user_profiles": ["email"]},
    )

    @projection.handles("UserRegistered")
    async def add_user(tx: ProjectionTx, event: RecordedEvent) -> None:
        await tx.connection.exec_driver_sql(
            f"INSERT INTO {tx.table('user_profiles')} (id, email) VALUES (%s, %s)"
            " ON CONFLICT DO NOTHING",
            (event.data["user_id"], event.data["email"]),
        )

Handlers must be deterministic functions of the events: a rebuild replays them and
must produce the same rows. They must not append events or call other services.
A handler that can do a run of events at once (one INSERT for thousands of rows)
registers with `handles_batch` and receives each run of consecutive events it
handles. Fastest of all, a handler registered with `handles_sql` returns one SQL
statement that reads the run from the relation `tx.batch` (rows of `events`), so a
rebuild never loads the events into Python:

    @projection.handles_sql("UserRegistered")
    def add_users(tx: ProjectionTx) -> str:
        return (
            f"INSERT INTO {tx.table('user_profiles')} (id, email)"
            f" SELECT (data->>'user_id')::uuid, data->>'email' FROM {tx.batch}"
            " ON CONFLICT DO NOTHING"
        )

Such a statement sees the data as stored, not upcast: it must handle each
`schema_version` the log holds. It takes no parameters of its own (write a
literal % as %%).

Read tables are generations: the physical table `<table>_g<N>`, and a view named
after the logical table pointing at the live generation. Readers always go through
the view. A rebuild fills generation N+1 while N keeps serving, then swaps the views
in one transaction (see `projectors.rebuild`).

Events are applied in batches, each in one transaction together with the
projection's checkpoint. The checkpoint row is locked first, and events at or below
it are dropped, so applying is idempotent and two processes never apply one event
twice.
"""

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from psycopg.rows import dict_row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.checkpoints import (
    RELAY,
    create_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from shared.db import driver_connection, transaction
from shared.event_store import LOG_START, EventStore, LogPosition, RecordedEvent
from shared.events.registry import EventRegistry

log = logging.getLogger(__name__)

IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# Serialises DDL on projection tables between processes starting at once.
_DDL_LOCK = "SELECT pg_advisory_xact_lock(hashtext('helix.projections.ddl'))"


# The run of events an SQL handler reads: by positions (events already loaded)
# or by a range of the log (a rebuild, which loads nothing).
_BATCH_BY_POSITIONS = (
    "(SELECT * FROM events WHERE position = ANY(%(batch_positions)s::bigint[])"
    " ORDER BY transaction_id, position) AS batch"
)
_BATCH_BY_RANGE = (
    "(SELECT * FROM events WHERE type = ANY(%(batch_types)s::text[])"
    " AND (transaction_id, position) > (%(batch_after_xid)s::text::xid8,"
    " %(batch_after_pos)s) AND (transaction_id, position) <="
    " (%(batch_until_xid)s::text::xid8, %(batch_until_pos)s)"
    " ORDER BY transaction_id, position) AS batch"
)


# The last event of each run of one handler in a range of the log.
_RUN_ENDS = """
SELECT transaction_id::text::bigint, position, handler FROM (
    SELECT e.transaction_id, e.position, h.handler,
           lead(h.handler) OVER (ORDER BY e.transaction_id, e.position) AS next
    FROM events e
    JOIN unnest(%(types)s::text[], %(handlers)s::int[]) AS h(type, handler)
      ON h.type = e.type
    WHERE (e.transaction_id, e.position) > (%(xid)s::text::xid8, %(pos)s)
      AND (e.transaction_id, e.position) <= (%(uxid)s::text::xid8, %(upos)s)
) runs
WHERE next IS DISTINCT FROM handler
ORDER BY transaction_id, position
"""


Row = dict[str, Any]


class ProjectionTx:
    """What a handler gets: the batch's connection and the tables it writes."""

    __slots__ = ("connection", "projection", "batch", "_tables")

    def __init__(
        self,
        connection: AsyncConnection,
        projection: "Projection",
        tables: Mapping[str, str],
        batch: str = "",
    ) -> None:
        self.connection = connection
        self.projection = projection
        self.batch = batch
        self._tables = tables

    def table(self, logical: str) -> str:
        """The physical name of `logical` in the generation being written."""
        return self._tables[logical]

    async def rows_by_id(
        self, logical: str, columns: Sequence[str], ids: Sequence[str]
    ) -> dict[str, Row]:
        """The rows of `logical` with these ids (an `id` column), by id, for a
        batch handler that folds its events onto them in Python."""
        driver = await driver_connection(self.connection)
        cursor = driver.cursor(row_factory=dict_row)
        await cursor.execute(
            f"SELECT {', '.join(columns)} FROM {self.table(logical)}"
            " WHERE id = ANY(%s::uuid[])",
            (list(ids),),
        )
        return {str(row["id"]): row for row in await cursor.fetchall()}

    def upsert_sql(self, logical: str, columns: Sequence[str]) -> str:
        """A statement that writes rows, given as a JSON array (`rows_json`),
        into `logical` whole, replacing those with the same id."""
        table = self.table(logical)
        updates = ", ".join(f"{name} = excluded.{name}" for name in columns[1:])
        return (
            f"INSERT INTO {table} ({', '.join(columns)})"
            f" SELECT {', '.join(columns)}"
            f" FROM jsonb_populate_recordset(NULL::{table}, %s::jsonb)"
            f" ON CONFLICT (id) DO UPDATE SET {updates}"
        )


def entity_id(event: RecordedEvent) -> str:
    """The id in the event's stream name (`job-<uuid>` gives the uuid), as text."""
    return str(UUID(event.stream_id.partition("-")[2]))


def fold_onto_rows(
    rows: dict[str, Row],
    events: Sequence[RecordedEvent],
    *,
    row_id: Callable[[RecordedEvent], str],
    created_by: str,
    new_row: Callable[[RecordedEvent], Row],
    next_row: Callable[[Row, RecordedEvent], Row],
    version: str,
) -> dict[str, Row]:
    """Fold a batch, in log order, onto the rows of its entities; the changed rows.

    A `created_by` event adds its entity's row unless there is one; any other
    event applies only to a row whose `version` column it is newer than. So a
    replayed or duplicated event changes nothing.
    """
    changed: dict[str, Row] = {}
    for event in events:
        key = row_id(event)
        row = rows.get(key)
        if event.type == created_by:
            if row is not None:
                continue
            row = new_row(event)
        elif row is None or event.version <= row[version]:
            continue
        else:
            row = next_row(row, event)
        rows[key] = changed[key] = row
    return changed


def rows_json(rows: Sequence[Row]) -> str:
    """Rows as the JSON array `ProjectionTx.upsert_sql` takes."""
    return json.dumps(list(rows), default=_json_value)


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a read table")


EventHandler = Callable[[ProjectionTx, RecordedEvent], Awaitable[None]]
BatchHandler = Callable[[ProjectionTx, Sequence[RecordedEvent]], Awaitable[None]]
SqlHandler = Callable[[ProjectionTx], str]


@dataclass(frozen=True, slots=True)
class _Handler:
    function: Callable[..., Any]
    kind: Literal["event", "batch", "sql"]
    event_types: tuple[str, ...]


class Projection:
    """A set of read tables and the handlers that build them from events."""

    def __init__(
        self,
        *,
        name: str,
        tables: Mapping[str, str],
        indexes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if not IDENTIFIER.match(name) or name == RELAY:
            raise ValueError(f"bad projection name {name!r}")
        for table in tables:
            if not IDENTIFIER.match(table):
                raise ValueError(f"bad table name {table!r} in projection {name}")
        unknown = set(indexes or {}) - set(tables)
        if unknown:
            raise ValueError(f"indexes on tables {name} does not have: {unknown}")
        self.name = name
        self.tables = dict(tables)
        self.indexes = {
            table: list(columns) for table, columns in (indexes or {}).items()
        }
        self._handlers: dict[str, _Handler] = {}

    def __repr__(self) -> str:
        return f"Projection({self.name!r})"

    def handles(self, *event_types: str) -> Callable[[EventHandler], EventHandler]:
        """Register a handler called with each event of `event_types`."""

        def register(function: EventHandler) -> EventHandler:
            self._register(_Handler(function, "event", event_types))
            return function

        return register

    def handles_batch(
        self, *event_types: str
    ) -> Callable[[BatchHandler], BatchHandler]:
        """Register a handler called with each run of consecutive `event_types`."""

        def register(function: BatchHandler) -> BatchHandler:
            self._register(_Handler(function, "batch", event_types))
            return function

        return register

    def handles_sql(self, *event_types: str) -> Callable[[SqlHandler], SqlHandler]:
        """Register a function returning SQL that applies a run from `tx.batch`."""

        def register(function: SqlHandler) -> SqlHandler:
            self._register(_Handler(function, "sql", event_types))
            return function

        return register

    def _register(self, handler: _Handler) -> None:
        for event_type in handler.event_types:
            if event_type in self._handlers:
                raise ValueError(f"{self.name} handles {event_type} twice")
            self._handlers[event_type] = handler

    @property
    def event_types(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def set_based(self) -> bool:
        """Whether every handler is SQL: a rebuild can then skip loading events."""
        return bool(self._handlers) and all(
            handler.kind == "sql" for handler in self._handlers.values()
        )

    @property
    def schema_hash(self) -> str:
        """Changes whenever the table definitions do (the live tables are stale)."""
        text = json.dumps([self.tables, self.indexes], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def generation_tables(self, generation: int) -> dict[str, str]:
        return {logical: f"{logical}_g{generation}" for logical in self.tables}

    async def apply(
        self,
        connection: AsyncConnection,
        tables: Mapping[str, str],
        events: Sequence[RecordedEvent],
    ) -> None:
        """Run the handlers for `events`, in log order, on `connection`."""
        tx = ProjectionTx(connection, self, tables)
        handled = [event for event in events if event.type in self._handlers]
        start = 0
        while start < len(handled):
            handler = self._handlers[handled[start].type]
            if handler.kind == "event":
                await handler.function(tx, handled[start])
                start += 1
                continue
            end = start + 1
            while end < len(handled) and self._handlers[handled[end].type] is handler:
                end += 1
            if handler.kind == "batch":
                await handler.function(tx, handled[start:end])
            else:
                positions = [event.position for event in handled[start:end]]
                await self._run_sql(
                    connection,
                    tables,
                    handler,
                    _BATCH_BY_POSITIONS,
                    {"batch_positions": positions},
                )
            start = end

    async def apply_range(
        self,
        connection: AsyncConnection,
        tables: Mapping[str, str],
        after: LogPosition,
        until: LogPosition,
    ) -> None:
        """Apply every event in (`after`, `until`] with SQL handlers only.

        The caller makes sure that the range is below the read horizon and that
        the projection is `set_based`. The range is cut into runs of one handler
        each in SQL; only the ends of the runs come back (one, for a projection
        with a single handler).
        """
        handlers = list(dict.fromkeys(self._handlers.values()))
        if len(handlers) == 1:
            await self._run_range(connection, tables, handlers[0], after, until)
            return
        types = self.event_types
        result = await connection.exec_driver_sql(
            _RUN_ENDS,
            {
                "types": types,
                "handlers": [handlers.index(self._handlers[t]) for t in types],
                "xid": str(after.transaction_id),
                "pos": after.position,
                "uxid": str(until.transaction_id),
                "upos": until.position,
            },
        )
        run_start = after
        ends: list[Any] = list(result.all())
        for transaction_id, position, handler_index in ends:
            run_end = LogPosition(transaction_id, position)
            await self._run_range(
                connection, tables, handlers[handler_index], run_start, run_end
            )
            run_start = run_end

    async def _run_range(
        self,
        connection: AsyncConnection,
        tables: Mapping[str, str],
        handler: _Handler,
        after: LogPosition,
        until: LogPosition,
    ) -> None:
        # Within a run, the handler's types are the only handled events.
        params = {
            "batch_types": list(handler.event_types),
            "batch_after_xid": str(after.transaction_id),
            "batch_after_pos": after.position,
            "batch_until_xid": str(until.transaction_id),
            "batch_until_pos": until.position,
        }
        await self._run_sql(connection, tables, handler, _BATCH_BY_RANGE, params)

    async def _run_sql(
        self,
        connection: AsyncConnection,
        tables: Mapping[str, str],
        handler: _Handler,
        batch: str,
        params: dict[str, Any],
    ) -> None:
        sql = handler.function(ProjectionTx(connection, self, tables, batch))
        await connection.exec_driver_sql(sql, params)


def checkpoint_name(projection: Projection, generation: int | None = None) -> str:
    """The live checkpoint's name, or that of a generation being built."""
    if generation is None:
        return projection.name
    return f"{projection.name}@g{generation}"


def _index_name(table: str, columns: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", columns.lower()).strip("_")
    name = f"{table}_{slug}_idx"
    if len(name) > 63:
        digest = hashlib.sha256(columns.encode()).hexdigest()[:8]
        name = f"{table[:40]}_{digest}_idx"
    return name


async def create_tables(
    connection: AsyncConnection,
    projection: Projection,
    tables: Mapping[str, str],
    *,
    with_indexes: bool = True,
    unlogged: bool = False,
) -> None:
    kind = "UNLOGGED TABLE" if unlogged else "TABLE"
    for logical, columns in projection.tables.items():
        await connection.exec_driver_sql(
            f"CREATE {kind} IF NOT EXISTS {tables[logical]} ({columns})"
        )
    if with_indexes:
        await create_indexes(connection, projection, tables)


async def create_indexes(
    connection: AsyncConnection, projection: Projection, tables: Mapping[str, str]
) -> None:
    for logical, index_columns in projection.indexes.items():
        physical = tables[logical]
        for columns in index_columns:
            await connection.exec_driver_sql(
                f"CREATE INDEX IF NOT EXISTS {_index_name(physical, columns)}"
                f" ON {physical} ({columns})"
            )


async def drop_tables(connection: AsyncConnection, tables: Mapping[str, str]) -> None:
    for physical in tables.values():
        await connection.exec_driver_sql(f"DROP TABLE IF EXISTS {physical}")


async def point_views(
    connection: AsyncConnection, projection: Projection, generation: int
) -> None:
    """Point each logical view at `generation` (drop and create: columns may change)."""
    for logical, physical in projection.generation_tables(generation).items():
        await connection.exec_driver_sql(f"DROP VIEW IF EXISTS {logical}")
        await connection.exec_driver_sql(
            f"CREATE VIEW {logical} AS SELECT * FROM {physical}"
        )


async def ensure_created(
    engine: AsyncEngine, projections: Sequence[Projection]
) -> list[Projection]:
    """Create what each projection needs, if missing; idempotent, safe to race.

    A new projection gets its state row, its checkpoint at the start of the log,
    generation 1 of its tables and the views. Returns the projections whose live
    tables were created from other definitions than the code's now (stale: they
    need a rebuild, see `projectors.rebuild`).
    """
    stale = []
    async with transaction(engine) as connection:
        await connection.exec_driver_sql(_DDL_LOCK)
        for projection in projections:
            row: Any = (
                await connection.exec_driver_sql(
                    "SELECT live_generation, schema_hash FROM projection_state"
                    " WHERE name = %s",
                    (projection.name,),
                )
            ).first()
            if row is None:
                await _create_projection(connection, projection)
                continue
            generation, schema_hash = row
            await connection.exec_driver_sql(
                "UPDATE projection_state SET event_types = %s WHERE name = %s",
                (projection.event_types, projection.name),
            )
            if schema_hash != projection.schema_hash:
                log.warning(
                    "projection tables differ from their definition; rebuild it",
                    extra={"projection": projection.name, "generation": generation},
                )
                stale.append(projection)
    return stale


async def retire(engine: AsyncEngine, name: str) -> bool:
    """Stop counting the lag of projection `name`, no longer in the code.

    Its tables and rows stay (something may still read them); with no event
    types it is never behind, so `/health/` does not fail forever on a
    projection nobody runs. False if there is no such projection.
    """
    async with transaction(engine) as connection:
        result = await connection.exec_driver_sql(
            "UPDATE projection_state SET event_types = '{}', updated_at = now()"
            " WHERE name = %s RETURNING name",
            (name,),
        )
        return result.first() is not None


async def _create_projection(
    connection: AsyncConnection, projection: Projection
) -> None:
    await connection.exec_driver_sql(
        "INSERT INTO projection_state (name, live_generation, schema_hash, event_types)"
        " VALUES (%s, 1, %s, %s)",
        (projection.name, projection.schema_hash, projection.event_types),
    )
    await create_checkpoint(connection, checkpoint_name(projection))
    await create_tables(connection, projection, projection.generation_tables(1))
    await point_views(connection, projection, 1)
    log.info("created projection", extra={"projection": projection.name})


async def live_tables(
    connection: AsyncConnection, projection: Projection
) -> dict[str, str]:
    generation = (
        await connection.exec_driver_sql(
            "SELECT live_generation FROM projection_state WHERE name = %s",
            (projection.name,),
        )
    ).scalar_one()
    return projection.generation_tables(generation)


async def apply_in_transaction(
    connection: AsyncConnection,
    projection: Projection,
    events: Sequence[RecordedEvent],
    *,
    through: LogPosition | None = None,
    generation: int | None = None,
    tables: Mapping[str, str] | None = None,
    locked: LogPosition | None = None,
) -> LogPosition:
    """Apply `events` and move the checkpoint, in the caller's transaction.

    Locks the checkpoint (of the live tables, or of `generation`), drops the events
    at or below it, applies the rest and moves it to the last one, or to `through`
    if that is further: the caller read the log up to `through` and found nothing
    else this projection handles. Returns the new checkpoint. `locked` is the
    checkpoint as the caller already read it FOR UPDATE in this transaction.
    """
    name = checkpoint_name(projection, generation)
    current = (
        locked
        if locked is not None
        else await read_checkpoint(connection, name, for_update=True)
    )
    if current is None:
        raise LookupError(f"no checkpoint {name}; run ensure_created first")
    fresh = [event for event in events if event.log_position > current]
    target = max([current, *(e.log_position for e in fresh[-1:]), through or current])
    if target == current:
        return current
    if fresh:
        # Looked up after the checkpoint lock: a swap of generations holds it too.
        if tables is None:
            tables = (
                await live_tables(connection, projection)
                if generation is None
                else projection.generation_tables(generation)
            )
        await projection.apply(connection, tables, fresh)
    await save_checkpoint(connection, name, target)

    return target


async def apply_batch(
    engine: AsyncEngine,
    projection: Projection,
    events: Sequence[RecordedEvent],
    *,
    through: LogPosition | None = None,
    generation: int | None = None,
) -> LogPosition:
    """Apply `events` and move the checkpoint in one transaction of its own."""
    async with transaction(engine) as connection:
        return await apply_in_transaction(
            connection, projection, events, through=through, generation=generation
        )


async def catch_up(
    engine: AsyncEngine,
    projection: Projection,
    *,
    events: EventRegistry | None = None,
    store: EventStore | None = None,
    until: LogPosition | None = None,
    batch_size: int = 2000,
    horizon_wait_s: float = 10.0,
) -> LogPosition:
    """Apply, from the store, everything after the live checkpoint up to `until`.

    Without `until`, goes to the head of the log as it is when called. The
    checkpoint ends at that point even if the last events there are of types this
    projection does not handle. Tests use this to project synchronously.

    `until` names a committed event; if a transaction still open elsewhere holds
    the read horizon below it, this waits for the horizon (up to
    `horizon_wait_s`), then goes as far as it can.
    """
    if store is None:
        store = EventStore(engine, events) if events is not None else EventStore(engine)
    head = await store.head()
    deadline = time.monotonic() + horizon_wait_s
    while until is not None and head < until and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        head = await store.head()
    # Never past the read horizon: moving the checkpoint to `until` claims that
    # every event up to it was read.
    until = head if until is None else min(until, head)
    if not projection.event_types:
        return await apply_batch(engine, projection, [], through=until)
    async with transaction(engine) as connection:
        position = await read_checkpoint(connection, checkpoint_name(projection))
    position = position or LOG_START
    while position < until:
        page = await store.read_all(
            position,
            limit=batch_size,
            types=projection.event_types,
            until=until,
        )
        through = until if len(page) < batch_size else None
        position = await apply_batch(engine, projection, page, through=through)

    return position
