"""Checkpoints: how far along the log each consumer of it has got.

A checkpoint is a `LogPosition` (transaction id, position), stored in the
`checkpoints` table under a name: "relay" for the relay, the projection's name for
a projection's live read tables. Projections also record, in `projection_state`,
the event types they handle, so a reader can tell that a projection has nothing
left to do before some position even when its checkpoint has not reached it.

The query API reads freshness from here (read-your-writes, lag in `/health/`); the
projectors write through the same functions.
"""

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import connect, driver_connection
from shared.errors import ValidationFailed
from shared.event_store import LOG_START, LogPosition
from shared.jobs.messaging import DISPATCHED_TYPES, DISPATCHER

RELAY = "relay"

_HORIZON = "e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())"


async def create_checkpoint(connection: AsyncConnection, name: str) -> None:
    await connection.exec_driver_sql(
        "INSERT INTO checkpoints (name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
        (name,),
    )


async def read_checkpoint(
    connection: AsyncConnection, name: str, *, for_update: bool = False
) -> LogPosition | None:
    """The checkpoint called `name`, or None if there is none.

    `for_update` locks the row until the transaction ends: every writer of a
    checkpoint does so, which serialises them, so two processes applying the same
    projection never apply one event twice.
    """
    sql = (
        "SELECT transaction_id::text::bigint, position FROM checkpoints"
        " WHERE name = %s" + (" FOR UPDATE" if for_update else "")
    )
    # On the driver: projectors read and write checkpoints once a batch.
    driver = await driver_connection(connection)
    row = await (await driver.execute(sql, (name,))).fetchone()
    return LogPosition(row[0], row[1]) if row else None


async def save_checkpoint(
    connection: AsyncConnection, name: str, position: LogPosition
) -> None:
    driver = await driver_connection(connection)
    await driver.execute(
        "INSERT INTO checkpoints (name, transaction_id, position, updated_at)"
        " VALUES (%s, %s::text::xid8, %s, now())"
        " ON CONFLICT (name) DO UPDATE SET transaction_id = excluded.transaction_id,"
        " position = excluded.position, updated_at = excluded.updated_at",
        (name, str(position.transaction_id), position.position),
    )


async def checkpoint(engine: AsyncEngine, name: str) -> LogPosition:
    async with connect(engine) as connection:
        return await read_checkpoint(connection, name) or LOG_START


@dataclass(frozen=True, slots=True)
class Lag:
    """How far a consumer of the log is behind its head."""

    name: str
    checkpoint: LogPosition
    events: int
    seconds: float
    updated_at_age_s: float


_LAG = f"""
SELECT c.name, c.transaction_id::text::bigint, c.position,
       coalesce(extract(epoch FROM now() - c.updated_at)::float8, 'infinity'),
       behind.events,
       coalesce(extract(epoch FROM now() - behind.oldest), 0)::float8
FROM (
    SELECT name, transaction_id, position, updated_at FROM checkpoints
    UNION ALL
    -- A consumer that has never run is behind by the whole log.
    SELECT expected, '0'::xid8, 0, NULL
    FROM unnest(%(expected)s::text[]) AS expected
    WHERE NOT EXISTS (SELECT 1 FROM checkpoints WHERE name = expected)
) c
LEFT JOIN projection_state s ON s.name = c.name
CROSS JOIN LATERAL (
    SELECT coalesce(s.event_types, ARRAY(
        SELECT jsonb_array_elements_text(%(consumer_types)s::jsonb -> c.name)
    )) AS types
) consumes
CROSS JOIN LATERAL (
    SELECT count(*) AS events, min(e.recorded_at) AS oldest
    FROM events e
    WHERE {_HORIZON}
      AND (e.transaction_id, e.position) > (c.transaction_id, c.position)
      AND (c.name = %(relay)s OR e.type = ANY(consumes.types))
) behind
WHERE c.name NOT LIKE '%%@%%' AND (%(names)s::text[] IS NULL OR c.name = ANY(%(names)s))
ORDER BY c.name
"""


async def lags(engine: AsyncEngine, names: Sequence[str] | None = None) -> list[Lag]:
    """Lag of the relay and of each projection's live tables, in events and seconds.

    A projection's lag counts only the event types it handles, the dispatcher's
    only those it dispatches; the relay's counts every event. Seconds are the age
    of the oldest event it has yet to process (0 when it is caught up). The relay
    and the dispatcher are there even before they first ran, behind by the log.
    """
    params = {
        "names": list(names) if names is not None else None,
        "expected": [RELAY, DISPATCHER],
        "relay": RELAY,
        "consumer_types": json.dumps({DISPATCHER: DISPATCHED_TYPES}),
    }
    async with connect(engine) as connection:
        rows: list[Any] = list((await connection.exec_driver_sql(_LAG, params)).all())
    return [
        Lag(row[0], LogPosition(row[1], row[2]), int(row[4]), float(row[5]), row[3])
        for row in rows
    ]


_CAUGHT_UP = """
SELECT count(*) FROM checkpoints c
JOIN projection_state s ON s.name = c.name
WHERE c.name = ANY(%(names)s)
  AND ((c.transaction_id, c.position) >= (%(xid)s::text::xid8, %(pos)s)
       OR NOT EXISTS (
           SELECT 1 FROM events e
           WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)
             AND (e.transaction_id, e.position) <= (%(xid)s::text::xid8, %(pos)s)
             AND e.type = ANY(s.event_types)))
"""

_LOCATE = "SELECT transaction_id::text::bigint FROM events WHERE position = %s"
# NULL on a hot standby: what it has replayed of the sequence says nothing of what
# its primary has handed out since.
_LAST_ISSUED = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL"
    " WHEN is_called THEN last_value ELSE 0 END FROM events_position_seq"
)


async def _refuse_unissued(connection: AsyncConnection, position: int) -> None:
    """A position the log has not handed out yet is no write's: no wait reaches it.

    A hot standby cannot tell such a position from one it has yet to replay, so
    there the wait just ends unprocessed.
    """
    last = (await connection.exec_driver_sql(_LAST_ISSUED)).scalar_one()
    if last is not None and position > last:
        raise ValidationFailed(f"position {position} is past the end of the log")


_BELOW_HORIZON = "SELECT %(xid)s::text::xid8 < pg_snapshot_xmin(pg_current_snapshot())"


async def processed(
    connection: AsyncConnection,
    names: Sequence[str],
    position: LogPosition,
    *,
    horizon: bool = True,
) -> bool:
    """Whether every projection in `names` reflects all events up to `position`.

    With no names, whether readers of the log itself see the event at
    `position`: at once if they read one stream (`horizon` false), once it is
    below the read horizon if they read across streams (the audit).
    """
    if not names and not horizon:
        return True
    if not names:
        below = await connection.exec_driver_sql(
            _BELOW_HORIZON, {"xid": str(position.transaction_id)}
        )
        return bool(below.scalar_one())
    params = {
        "names": list(names),
        "xid": str(position.transaction_id),
        "pos": position.position,
    }
    result = await connection.exec_driver_sql(_CAUGHT_UP, params)
    return int(result.scalar_one()) == len(set(names))


async def wait_until_processed(
    engine: AsyncEngine,
    names: Sequence[str],
    position: int,
    *,
    timeout_s: float,
    poll_s: float = 0.01,
    max_poll_s: float = 0.1,
    horizon: bool = True,
) -> bool:
    """Wait until the projections `names` (none: the log's readers, see
    `processed`) have processed global `position`.

    Returns False if they have not within `timeout_s`. A position not in the log
    (yet: a replica may lag its primary) counts as not processed; one the log had
    not even handed out when the wait ended is refused with ValidationFailed, for
    no wait would reach it. Polls with a short, growing interval: waits are brief,
    and a checkpoint moves often.
    """
    deadline = time.monotonic() + timeout_s
    located: LogPosition | None = None
    while True:
        async with connect(engine) as connection:
            if located is None:
                row: Any = (
                    await connection.exec_driver_sql(_LOCATE, (position,))
                ).first()
                located = LogPosition(row[0], position) if row else None
            if located is not None and await processed(
                connection, names, located, horizon=horizon
            ):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if located is None:
                    await _refuse_unissued(connection, position)
                return False
        await asyncio.sleep(min(poll_s, remaining))
        poll_s = min(poll_s * 2, max_poll_s)


@dataclass(frozen=True, slots=True)
class HorizonHolder:
    """The oldest transaction on the server that has written something.

    Readers of the log go only below it (the read horizon), so while it stays
    open no consumer sees anything committed after it began.
    """

    pid: int
    application: str
    state: str
    open_s: float

    def describe(self) -> str:
        return (
            f"the log's read horizon is held by PostgreSQL backend {self.pid}"
            f" ({self.application or 'no application name'}, {self.state}),"
            f" whose transaction has been open {self.open_s:.0f} s"
        )


_HORIZON_HOLDER = """
SELECT pid, coalesce(application_name, ''), coalesce(state, ''),
       coalesce(extract(epoch FROM now() - xact_start), 0)::float8
FROM pg_stat_activity
WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
ORDER BY age(backend_xid) DESC
LIMIT 1
"""


async def horizon_holder(engine: AsyncEngine) -> HorizonHolder | None:
    """The transaction that holds the read horizon back, if any is open."""
    async with connect(engine) as connection:
        row: Any = (await connection.exec_driver_sql(_HORIZON_HOLDER)).first()
    return HorizonHolder(*row) if row else None


# On a hot standby: whether it streams from its primary, what it received and
# has replayed, and how long ago the last transaction it replayed committed.
_REPLAY_STATE = """
SELECT pg_is_in_recovery(),
       EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'),
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(),
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
"""
_REPLAYED = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
# How long replay gets to reach what was received, before it counts as behind.
REPLAY_SETTLE_S = 0.2


async def replay_lag(engine: AsyncEngine) -> float | None:
    """How far a hot standby's data may trail its primary, in seconds; None on
    a primary.

    Streaming and keeping up with what it receives, it trails by nothing worth
    counting. Otherwise (replay falling behind, or cut off from its primary) it
    trails by at most the age of the last transaction it replayed, which is
    what counts. The lag of the consumers says nothing of it: on a standby, the
    log and the checkpoints trail together.
    """
    async with connect(engine) as connection:
        row: Any = (await connection.exec_driver_sql(_REPLAY_STATE)).one()
        standby, streaming, received, caught_up, since_replay = row
        if not standby:
            return None
        if streaming and not caught_up:
            # Replay may just be busy with what arrived a moment ago.
            await asyncio.sleep(REPLAY_SETTLE_S)
            result = await connection.exec_driver_sql(_REPLAYED, (received,))
            caught_up = result.scalar_one()
        if streaming and caught_up:
            return 0.0
    return math.inf if since_replay is None else max(0.0, float(since_replay))


def lag_check(
    engine: AsyncEngine, max_lag_s: float = 300.0
) -> Callable[[], Awaitable[None]]:
    """A `/health/` check: fails when the relay or a projection is far behind,
    when a transaction open that long holds the log's read horizon, or when the
    database is a hot standby that far behind its primary.

    The bound is generous on purpose: a lagging projection answers reads with
    older data (and read-your-writes with 503s), which is worth an alert, but
    taking the query API out of rotation would not make it catch up sooner.
    """

    async def check() -> None:
        problems = [
            f"{lag.name} is {lag.events} events ({lag.seconds:.0f} s) behind"
            for lag in await lags(engine)
            if lag.seconds > max_lag_s
        ]
        # Lag counts only what consumers could read; a long transaction
        # elsewhere on the server stops them all without showing there.
        holder = await horizon_holder(engine)
        if holder is not None and holder.open_s > max_lag_s:
            problems.append(holder.describe())
        standby_lag = await replay_lag(engine)
        if standby_lag is not None and standby_lag > max_lag_s:
            problems.append(
                f"this hot standby may be {standby_lag:.0f} s behind its primary"
                " (it has replayed nothing newer, and is not keeping up)"
            )
        if problems:
            raise RuntimeError("; ".join(problems))

    return check
