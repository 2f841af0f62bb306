"""Blue-green rebuilds of a projection from the log, and verification against it.

A rebuild fills generation N+1 of the tables from the start of the log while
generation N keeps serving and keeps being updated. The new generation has its own
checkpoint (`<name>@g<N+1>`), so an interrupted rebuild resumes where it stopped.
Once it is nearly caught up, one transaction locks the live checkpoint (pausing the
live projector for a moment), applies the last events, points the views at N+1
and takes over the checkpoint. Generation N is dropped afterwards.

Verification rebuilds into scratch tables up to the live checkpoint and compares
them with the live tables row by row, with the live checkpoint locked.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from projectors.framework import (
    Projection,
    apply_in_transaction,
    checkpoint_name,
    create_indexes,
    create_tables,
    drop_tables,
    point_views,
)
from shared.checkpoints import read_checkpoint, save_checkpoint
from shared.db import connect, transaction
from shared.errors import Conflict
from shared.event_store import LOG_START, EventStore, LogPosition, RecordedEvent

log = logging.getLogger(__name__)

# (events applied so far, events to apply in all)
Progress = Callable[[int, int], None]

REBUILD_BATCH = 50_000
DIFFERENCES_SHOWN = 20


@dataclass(frozen=True, slots=True)
class RebuildResult:
    projection: str
    generation: int
    events: int
    checkpoint: LogPosition


async def count_events(
    engine: AsyncEngine, projection: Projection, after: LogPosition = LOG_START
) -> int:
    async with connect(engine) as connection:
        result = await connection.exec_driver_sql(
            "SELECT count(*) FROM events WHERE type = ANY(%s)"
            " AND (transaction_id, position) > (%s::text::xid8, %s)",
            (projection.event_types, str(after.transaction_id), after.position),
        )
        return int(result.scalar_one())


async def _pages(
    store: EventStore,
    projection: Projection,
    after: LogPosition,
    until: LogPosition | None,
    batch_size: int,
) -> AsyncIterator[list[RecordedEvent]]:
    """Pages of the events `projection` handles, reading one page ahead."""

    async def read(position: LogPosition) -> list[RecordedEvent]:
        return await store.read_all(
            position, limit=batch_size, types=projection.event_types, until=until
        )

    if not projection.event_types:
        return
    pending = asyncio.create_task(read(after))
    try:
        while True:
            page = await pending
            if len(page) < batch_size:
                if page:
                    yield page
                return
            pending = asyncio.create_task(read(page[-1].log_position))
            yield page
    finally:
        pending.cancel()


async def _fill(
    engine: AsyncEngine,
    store: EventStore,
    projection: Projection,
    *,
    generation: int | None,
    tables: Mapping[str, str] | None,
    checkpoint: str,
    until: LogPosition | None,
    progress: Progress | None,
    done: int,
    total: int,
    batch_size: int,
) -> tuple[LogPosition, int]:
    """Apply everything after `checkpoint` up to `until` into a non-live target."""
    async with connect(engine) as connection:
        position = await read_checkpoint(connection, checkpoint) or LOG_START
    if projection.set_based:
        return await _fill_set_based(
            engine,
            projection,
            tables or projection.generation_tables(generation or 0),
            checkpoint,
            position,
            until,
            progress,
            done,
            total,
            batch_size,
            # A generation's checkpoint goes only when a rebuild swaps it in.
            building=generation is not None,
        )
    async for page in _pages(store, projection, position, until, batch_size):
        async with transaction(engine) as connection:
            position = await _apply_to(
                connection, projection, page, checkpoint, generation, tables
            )
        done += len(page)
        if progress is not None:
            progress(done, max(total, done))
    return position, done


_PAGE_END = """
SELECT transaction_id::text::bigint, position, count(*) OVER () FROM (
    SELECT transaction_id, position FROM events
    WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
      AND type = ANY(%(types)s)
      AND (transaction_id, position) > (%(xid)s::text::xid8, %(pos)s)
      AND (%(uxid)s::text IS NULL
           OR (transaction_id, position) <= (%(uxid)s::text::xid8, %(upos)s))
    ORDER BY transaction_id, position LIMIT %(limit)s
) page
ORDER BY transaction_id DESC, position DESC LIMIT 1
"""


async def _fill_set_based(
    engine: AsyncEngine,
    projection: Projection,
    tables: Mapping[str, str],
    checkpoint: str,
    position: LogPosition,
    until: LogPosition | None,
    progress: Progress | None,
    done: int,
    total: int,
    batch_size: int,
    *,
    building: bool,
) -> tuple[LogPosition, int]:
    """Like `_fill`, with SQL handlers reading the events where they are.

    When `building` a generation, its checkpoint gone means another rebuild of
    the same generation swapped it in: starting over from the log's beginning
    would apply every event a second time to what is now the live table.
    """
    while True:
        async with transaction(engine) as connection:
            current = await read_checkpoint(connection, checkpoint, for_update=True)
            if current is None and building:
                raise Conflict(f"another rebuild of {projection.name} took over")
            current = current or LOG_START
            params = {
                "types": projection.event_types,
                "xid": str(current.transaction_id),
                "pos": current.position,
                "uxid": None if until is None else str(until.transaction_id),
                "upos": None if until is None else until.position,
                "limit": batch_size,
            }
            row: Any = (await connection.exec_driver_sql(_PAGE_END, params)).first()
            if row is None:
                return current, done
            page_end = LogPosition(row[0], row[1])
            await projection.apply_range(connection, tables, current, page_end)
            await save_checkpoint(connection, checkpoint, page_end)
        done += int(row[2])
        if progress is not None:
            progress(done, max(total, done))


async def _apply_to(
    connection: AsyncConnection,
    projection: Projection,
    events: Sequence[RecordedEvent],
    checkpoint: str,
    generation: int | None,
    tables: Mapping[str, str] | None,
    through: LogPosition | None = None,
) -> LogPosition:
    if generation is not None:
        return await apply_in_transaction(
            connection, projection, events, generation=generation, through=through
        )
    # Scratch tables of a verification: their own checkpoint row, no generation.
    current = await read_checkpoint(connection, checkpoint, for_update=True)
    current = current or LOG_START
    fresh = [event for event in events if event.log_position > current]
    assert tables is not None
    await projection.apply(connection, tables, fresh)
    target = max([current, *(e.log_position for e in fresh[-1:]), through or current])
    await save_checkpoint(connection, checkpoint, target)
    return target


async def _start_generation(engine: AsyncEngine, projection: Projection) -> int:
    """The generation to build: the one an interrupted rebuild left, or a new one."""
    async with transaction(engine) as connection:
        row: Any = (
            await connection.exec_driver_sql(
                "SELECT live_generation, building_generation, building_schema_hash"
                " FROM projection_state WHERE name = %s FOR UPDATE",
                (projection.name,),
            )
        ).first()
        if row is None:
            raise LookupError(f"projection {projection.name} was never created")
        live, building, building_hash = row
        if building is not None and building_hash == projection.schema_hash:
            log.info(
                "resuming rebuild",
                extra={"projection": projection.name, "generation": building},
            )
            return int(building)
        if building is not None:
            await _drop_generation(connection, projection, building)
        generation = int(max(live, building or 0)) + 1
        await create_tables(
            connection,
            projection,
            projection.generation_tables(generation),
            with_indexes=False,
        )
        await save_checkpoint(
            connection, checkpoint_name(projection, generation), LOG_START
        )
        await connection.exec_driver_sql(
            "UPDATE projection_state SET building_generation = %s,"
            " building_schema_hash = %s, updated_at = now() WHERE name = %s",
            (generation, projection.schema_hash, projection.name),
        )
        return generation


async def _drop_generation(
    connection: AsyncConnection, projection: Projection, generation: int
) -> None:
    await drop_tables(connection, projection.generation_tables(generation))
    await connection.exec_driver_sql(
        "DELETE FROM checkpoints WHERE name = %s",
        (checkpoint_name(projection, generation),),
    )


async def rebuild(
    engine: AsyncEngine,
    projection: Projection,
    *,
    store: EventStore,
    progress: Progress | None = None,
    batch_size: int = REBUILD_BATCH,
) -> RebuildResult:
    """Rebuild `projection` into a new generation and swap it in; see the module."""
    generation = await _start_generation(engine, projection)
    building = checkpoint_name(projection, generation)
    async with connect(engine) as connection:
        start = await read_checkpoint(connection, building) or LOG_START
    done = 0
    total = await count_events(engine, projection, start)
    position, done = await _fill(
        engine,
        store,
        projection,
        generation=generation,
        tables=None,
        checkpoint=building,
        until=None,
        progress=progress,
        done=done,
        total=total,
        batch_size=batch_size,
    )
    # Indexes after the bulk of the rows: building them once is much cheaper
    # than maintaining them row by row.
    async with transaction(engine) as connection:
        await create_indexes(
            connection, projection, projection.generation_tables(generation)
        )

    async with transaction(engine) as connection:
        live = checkpoint_name(projection)
        # Holding the live checkpoint pauses the live projector until we commit.
        await read_checkpoint(connection, live, for_update=True)
        state: Any = (
            await connection.exec_driver_sql(
                "SELECT live_generation, building_generation FROM projection_state"
                " WHERE name = %s FOR UPDATE",
                (projection.name,),
            )
        ).one()
        if state[1] != generation:
            raise Conflict(f"another rebuild of {projection.name} took over")
        old_generation = int(state[0])
        head = await store.head()
        tail: list[RecordedEvent] = []
        async for page in _pages(store, projection, position, head, batch_size):
            tail.extend(page)
        position = await apply_in_transaction(
            connection, projection, tail, generation=generation, through=head
        )
        done += len(tail)
        await point_views(connection, projection, generation)
        await connection.exec_driver_sql(
            "UPDATE projection_state SET live_generation = %s, schema_hash ="
            " building_schema_hash, building_generation = NULL,"
            " building_schema_hash = NULL, event_types = %s, updated_at = now()"
            " WHERE name = %s",
            (generation, projection.event_types, projection.name),
        )
        await save_checkpoint(connection, live, position)
        await connection.exec_driver_sql(
            "DELETE FROM checkpoints WHERE name = %s", (building,)
        )
    if progress is not None:
        progress(done, done)

    if old_generation != generation:
        async with transaction(engine) as connection:
            await drop_tables(connection, projection.generation_tables(old_generation))
    log.info(
        "projection rebuilt",
        extra={"projection": projection.name, "generation": generation, "events": done},
    )
    return RebuildResult(projection.name, generation, done, position)


@dataclass(frozen=True)
class TableDifference:
    table: str
    only_live: list[dict[str, Any]] = field(default_factory=list)
    only_rebuilt: list[dict[str, Any]] = field(default_factory=list)
    live_rows: int = 0
    rebuilt_rows: int = 0


async def verify(
    engine: AsyncEngine,
    projection: Projection,
    *,
    store: EventStore,
    progress: Progress | None = None,
    batch_size: int = REBUILD_BATCH,
) -> list[TableDifference]:
    """Rebuild into scratch tables and compare with the live ones.

    Returns one entry per table that differs (empty when they all match), with up
    to DIFFERENCES_SHOWN rows found only on either side.
    """
    suffix = uuid.uuid4().hex[:8]
    scratch = {logical: f"{logical}_verify_{suffix}" for logical in projection.tables}
    scratch_checkpoint = f"{projection.name}@verify-{suffix}"
    async with transaction(engine) as connection:
        await create_tables(connection, projection, scratch, unlogged=True)
        await save_checkpoint(connection, scratch_checkpoint, LOG_START)
    try:
        async with connect(engine) as connection:
            until = await read_checkpoint(connection, projection.name) or LOG_START
        total = await count_events(engine, projection)
        position, done = await _fill(
            engine,
            store,
            projection,
            generation=None,
            tables=scratch,
            checkpoint=scratch_checkpoint,
            until=until,
            progress=progress,
            done=0,
            total=total,
            batch_size=batch_size,
        )
        async with transaction(engine) as connection:
            # The live tables cannot move while we hold their checkpoint.
            until = (
                await read_checkpoint(connection, projection.name, for_update=True)
                or LOG_START
            )
            tail: list[RecordedEvent] = []
            async for page in _pages(store, projection, position, until, batch_size):
                tail.extend(page)
            await _apply_to(
                connection,
                projection,
                tail,
                scratch_checkpoint,
                None,
                scratch,
                through=until,
            )
            if progress is not None:
                progress(done + len(tail), done + len(tail))
            return [
                difference
                for logical in projection.tables
                if (difference := await _compare(connection, logical, scratch[logical]))
            ]
    finally:
        async with transaction(engine) as connection:
            await drop_tables(connection, scratch)
            await connection.exec_driver_sql(
                "DELETE FROM checkpoints WHERE name = %s", (scratch_checkpoint,)
            )


async def _compare(
    connection: AsyncConnection, live: str, rebuilt: str
) -> TableDifference | None:
    async def rows_only_in(a: str, b: str) -> list[dict[str, Any]]:
        result = await connection.exec_driver_sql(
            f"SELECT to_jsonb(d) FROM (SELECT * FROM {a} EXCEPT ALL"
            f" SELECT * FROM {b}) d LIMIT {DIFFERENCES_SHOWN}"
        )
        return [row[0] for row in result.all()]

    async def count(table: str) -> int:
        result = await connection.exec_driver_sql(f"SELECT count(*) FROM {table}")
        return int(result.scalar_one())

    only_live = await rows_only_in(live, rebuilt)
    only_rebuilt = await rows_only_in(rebuilt, live)
    if not only_live and not only_rebuilt:
        return None
    return TableDifference(
        live, only_live, only_rebuilt, await count(live), await count(rebuilt)
    )
