"""The event store: an append-only log of events in PostgreSQL.

Streams are named `<category>-<uuid>` and versioned from 1. Every event also has a
global `position`, handed out by a sequence, and the `transaction_id` of the
transaction that appended it.

The log is read in (transaction_id, position) order, and only below the oldest
transaction still in flight (`pg_snapshot_xmin`). Positions are handed out in one
order and commits land in another, so a reader that went by position alone could
pass position 100 while 99 is still uncommitted, and never see it. Below the xmin
horizon every transaction has either committed or aborted, and any transaction that
starts later gets a higher id, so nothing can appear behind a reader. Writers never
wait for each other; a reader waits, at most, for the slowest open transaction.

One implementation serves every caller: the services run it on asyncio, and the
Celery worker runs the same coroutines on an event loop of its own.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID, uuid4

import psycopg
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import (
    AFTER_COMMIT,
    connect,
    driver_connection,
    fetch,
    is_unavailable,
)
from shared.errors import (
    DuplicateEventId,
    StoreUnavailable,
    UnknownEventType,
    ValidationFailed,
    WrongExpectedVersion,
)
from shared.events.registry import DomainEvent, EventRegistry, registry
from shared.group_commit import GroupCommitter, Outcome
from shared.log_listener import notify_tailers

STREAM_ID = re.compile(r"^(?P<category>[a-z][a-z0-9_]*)-(?P<id>[A-Za-z0-9_-]+)$")
ANY_VERSION = None
NO_STREAM = 0


class LogPosition(NamedTuple):
    """A place in the log: readers and checkpoints move along it in this order."""

    transaction_id: int
    position: int


LOG_START = LogPosition(0, 0)


class EventMetadata(BaseModel):
    """Who caused an event, in answer to what, and which component wrote it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    actor_id: UUID | None = None
    correlation_id: str | None = None
    causation_id: UUID | None = None


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored, its data already upcast to the current schema."""

    position: int
    transaction_id: int
    stream_id: str
    category: str
    version: int
    event_id: UUID
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime

    @property
    def log_position(self) -> LogPosition:
        return LogPosition(self.transaction_id, self.position)

    def event(self, events: EventRegistry = registry) -> DomainEvent:
        return events.parse(self.type, self.data)

    def envelope(self) -> dict[str, Any]:
        """The JSON-ready form that leaves the process (relay, CLI)."""
        return {
            "position": self.position,
            "transaction_id": self.transaction_id,
            "stream_id": self.stream_id,
            "category": self.category,
            "version": self.version,
            "event_id": str(self.event_id),
            "type": self.type,
            "schema_version": self.schema_version,
            "data": self.data,
            "metadata": self.metadata,
            "recorded_at": self.recorded_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class AppendResult:
    stream_id: str
    version: int
    positions: list[int]
    already_stored: bool = False
    # When the new events were recorded: the start of the appending transaction.
    # None when they were stored already.
    recorded_at: datetime | None = None

    @property
    def last_position(self) -> int:
        return self.positions[-1]


def category_of(stream_id: str) -> str:
    match = STREAM_ID.match(stream_id)
    if match is None:
        raise ValidationFailed(f"malformed stream id {stream_id!r}")
    return match["category"]


def stream_name(category: str, entity_id: UUID) -> str:
    return f"{category}-{entity_id}"


_COLUMNS = (
    "position, transaction_id::text::bigint, stream_id, category, version, event_id,"
    " type, schema_version, data, metadata, recorded_at"
)
_HORIZON = "transaction_id < pg_snapshot_xmin(pg_current_snapshot())"

# One round trip: read the stream's version and any already stored event ids, and
# insert only when the version matches and none of the ids is stored yet. Two
# writers racing past the version check collide on (stream_id, version).
_APPEND = """
WITH current AS (
    SELECT coalesce(max(version), 0) AS version
    FROM events WHERE stream_id = %(stream_id)s
), stored AS (
    SELECT json_agg(json_build_array(stream_id, version, position)
                    ORDER BY position) AS rows
    FROM events WHERE event_id = ANY(%(event_ids)s::uuid[])
), inserted AS (
    INSERT INTO events
        (stream_id, category, version, event_id, type, schema_version, data, metadata)
    SELECT %(stream_id)s, %(category)s, current.version + new.n, new.event_id,
           new.type, new.schema_version, new.data, %(metadata)s::jsonb
    FROM current, stored,
         unnest(%(event_ids)s::uuid[], %(types)s::text[], %(schema_versions)s::int[],
                %(data)s::jsonb[]) WITH ORDINALITY
             AS new(event_id, type, schema_version, data, n)
    WHERE stored.rows IS NULL
      AND (%(expected_version)s::int IS NULL
           OR current.version = %(expected_version)s::int)
    ORDER BY new.n
    RETURNING version, position
)
SELECT current.version, stored.rows,
       (SELECT array_agg(position ORDER BY version) FROM inserted), now()
FROM current, stored
"""

ANY_VERSION_ATTEMPTS = 5


class EventStore:
    """Append to streams and read them back, one stream or the whole log.

    `append` is atomic: every event of the call lands, in one transaction, or none
    does. Pass `connection` to append inside a transaction the caller opened, so
    that command-side rows (an email reservation, credentials) commit with them,
    or on a session of the caller's in autocommit mode, where it commits at once.
    """

    def __init__(self, engine: AsyncEngine, events: EventRegistry = registry) -> None:
        self.engine = engine
        self.events = events
        self._group_commit: GroupCommitter[AppendResult] = GroupCommitter(
            engine,
            single=self._append_in_own_transaction,
            resolve=self._resolve,
            after_commit=notify_tailers,
        )

    async def append(
        self,
        stream_id: str,
        events: Sequence[DomainEvent],
        *,
        expected_version: int | None,
        metadata: EventMetadata,
        event_ids: Sequence[UUID] | None = None,
        connection: AsyncConnection | None = None,
    ) -> AppendResult:
        """Append `events` to `stream_id`, which must be at `expected_version`.

        `expected_version` is the version the caller last saw: `NO_STREAM` (0) for
        a stream that must not exist yet, `ANY_VERSION` (None) to skip the check.
        Raises WrongExpectedVersion when another writer got there first. Appending
        event ids that are all stored already changes nothing and returns the
        original positions, so a command retried after a lost answer is harmless.
        """
        params = self._encode(stream_id, events, metadata, event_ids)
        params["expected_version"] = expected_version
        if connection is not None:
            driver = await driver_connection(connection)
            result: AppendResult = await self._append(driver, params)
            if driver.autocommit:
                # No transaction around it: the statement has committed already.
                await notify_tailers(driver)
                return result
            # shared.db.transaction() runs these once the caller's transaction
            # has committed; until then there is nothing to wake tailers for.
            callbacks = connection.info.setdefault(AFTER_COMMIT, [])
            if notify_tailers not in callbacks:
                callbacks.append(notify_tailers)
            return result
        attempts = ANY_VERSION_ATTEMPTS if expected_version is None else 1
        for attempt in range(1, attempts + 1):
            try:
                result = await self._group_commit.append(params)
            except DuplicateEventId:
                # A retry raced the original: now that it committed, this is a no-op.
                result = await self._group_commit.append(params)
            except WrongExpectedVersion:
                # Without an expected version a lost race just means "try again".
                if attempt == attempts:
                    raise
                continue
            return result
        raise AssertionError("unreachable")

    def _encode(
        self,
        stream_id: str,
        events: Sequence[DomainEvent],
        metadata: EventMetadata,
        event_ids: Sequence[UUID] | None,
    ) -> dict[str, Any]:
        if not events:
            raise ValidationFailed("an append needs at least one event")
        if event_ids is not None and len(event_ids) != len(events):
            raise ValidationFailed("one event id is needed for each event")
        types, schema_versions, data = [], [], []
        for event in events:
            event_type, event_data = self.events.encode(event)
            types.append(event_type.name)
            schema_versions.append(event_type.version)
            data.append(event_data)
        return {
            "stream_id": stream_id,
            "category": category_of(stream_id),
            "event_ids": list(event_ids) if event_ids else [uuid4() for _ in events],
            "types": types,
            "schema_versions": schema_versions,
            "data": data,
            "metadata": metadata.model_dump_json(exclude_none=True),
        }

    async def _append_in_own_transaction(self, params: dict[str, Any]) -> AppendResult:
        # The append is one statement, hence atomic on its own: running it in
        # autocommit saves the BEGIN and COMMIT round trips.
        async with connect(self.engine) as connection:
            driver = await driver_connection(connection)
            await driver.set_autocommit(True)
            try:
                result = await self._insert(driver, params)
                await notify_tailers(driver)
                return result
            finally:
                await driver.set_autocommit(False)

    async def _append(
        self, driver: psycopg.AsyncConnection, params: dict[str, Any]
    ) -> AppendResult:
        try:
            return await self._insert(driver, params)
        except psycopg.OperationalError as exc:
            if is_unavailable(exc):
                raise StoreUnavailable("PostgreSQL is unavailable") from exc
            raise

    async def _insert(
        self, driver: psycopg.AsyncConnection, params: dict[str, Any]
    ) -> AppendResult:
        stream_id, expected_version = params["stream_id"], params["expected_version"]
        try:
            cursor = await driver.execute(_APPEND, params, prepare=False)
        except psycopg.errors.UniqueViolation as exc:
            constraint = exc.diag.constraint_name
            if constraint == "events_stream_id_version_key":
                raise WrongExpectedVersion(stream_id, expected_version, -1) from exc
            if constraint == "events_event_id_key":
                raise DuplicateEventId("an event id was appended concurrently") from exc
            raise
        except psycopg.DataError as exc:
            reason = exc.diag.message_primary or "invalid data"
            raise ValidationFailed(f"PostgreSQL refused the events: {reason}") from exc
        row = await cursor.fetchone()
        assert row is not None
        return self._resolve(params, row)

    def _resolve(self, params: dict[str, Any], outcome: Outcome) -> AppendResult:
        stream_id, expected_version = params["stream_id"], params["expected_version"]
        current_version, stored, positions, recorded_at = outcome

        if stored:
            return self._already_stored(stream_id, params, stored)
        if positions is None:
            raise WrongExpectedVersion(stream_id, expected_version, current_version)
        return AppendResult(
            stream_id,
            current_version + len(positions),
            positions,
            recorded_at=recorded_at,
        )

    @staticmethod
    def _already_stored(
        stream_id: str, params: dict[str, Any], stored: list[list[Any]]
    ) -> AppendResult:
        if len(stored) != len(params["event_ids"]) or any(
            row[0] != stream_id for row in stored
        ):
            raise DuplicateEventId(
                "some of these event ids are stored already, with other content"
            )
        return AppendResult(
            stream_id,
            max(row[1] for row in stored),
            [row[2] for row in stored],
            already_stored=True,
        )

    async def _fetch(
        self,
        sql: str,
        params: Any = None,
        connection: AsyncConnection | psycopg.AsyncConnection | None = None,
    ) -> list[tuple[Any, ...]]:
        if connection is not None:
            if isinstance(connection, AsyncConnection):
                connection = await driver_connection(connection)
            cursor = await connection.execute(sql, params)
            return await cursor.fetchall()
        # One statement reads a consistent snapshot on its own: autocommit
        # saves the BEGIN and ROLLBACK round trips.
        return await fetch(self.engine, sql, params)

    async def stream_version(self, stream_id: str) -> int:
        [(version,)] = await self._fetch(
            "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = %s",
            (stream_id,),
        )
        return int(version)

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int = 1,
        limit: int | None = None,
        connection: AsyncConnection | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream in version order, from `from_version` on.

        Pass `connection` to read on a connection the caller already holds (in
        its transaction, if it has one) instead of one from the pool.
        """
        sql = (
            f"SELECT {_COLUMNS} FROM events"
            " WHERE stream_id = %(stream_id)s AND version >= %(from_version)s"
            " ORDER BY version LIMIT %(limit)s"
        )
        params = {"stream_id": stream_id, "from_version": from_version, "limit": limit}
        rows = await self._fetch(sql, params, connection)
        return [self._recorded(row) for row in rows]

    async def read_all(
        self,
        after: LogPosition = LOG_START,
        *,
        limit: int = 1000,
        categories: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
        until: LogPosition | None = None,
        connection: AsyncConnection | psycopg.AsyncConnection | None = None,
    ) -> list[RecordedEvent]:
        """The next `limit` events of the log after `after`, in log order.

        Only committed events below the xmin horizon are returned, so calling
        again from the last one returned never skips an event. `until` stops at
        a position (inclusive), for a reader that catches up to a known point.
        `connection`, if given, is one the caller holds (a driver connection in
        autocommit, or a SQLAlchemy one in its transaction) instead of the pool's.
        """
        filters = [
            _HORIZON,
            "(transaction_id, position) > (%(xid)s::text::xid8, %(pos)s)",
        ]
        params: dict[str, Any] = {
            "xid": str(after.transaction_id),
            "pos": after.position,
        }
        if until is not None:
            filters.append(
                "(transaction_id, position) <= (%(uxid)s::text::xid8, %(upos)s)"
            )
            params.update(uxid=str(until.transaction_id), upos=until.position)
        if categories:
            filters.append("category = ANY(%(categories)s)")
            params["categories"] = list(categories)
        if types:
            filters.append("type = ANY(%(types)s)")
            params["types"] = list(types)
        sql = (
            f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(filters)}"
            f" ORDER BY transaction_id, position LIMIT {int(limit)}"
        )
        rows = await self._fetch(sql, params, connection)
        return [self._recorded(row) for row in rows]

    async def head(self) -> LogPosition:
        """The last event a reader of the log can see now (LOG_START if none)."""
        sql = (
            "SELECT transaction_id::text::bigint, position FROM events"
            f" WHERE {_HORIZON} ORDER BY transaction_id DESC, position DESC LIMIT 1"
        )
        rows = await self._fetch(sql)
        return LogPosition(*rows[0]) if rows else LOG_START

    async def locate(self, position: int) -> LogPosition | None:
        """Where global `position` lies in log order, or None if no such event."""
        sql = (
            "SELECT transaction_id::text::bigint, position FROM events"
            " WHERE position = %s"
        )
        rows = await self._fetch(sql, (position,))
        return LogPosition(*rows[0]) if rows else None

    def _recorded(self, row: Any) -> RecordedEvent:
        event = RecordedEvent(*row)
        try:
            event_type = self.events.get(event.type)
        except UnknownEventType:
            return event
        if event.schema_version >= event_type.version:
            return event
        return replace(
            event,
            data=event_type.upcast(event.data, event.schema_version),
            schema_version=event_type.version,
        )
