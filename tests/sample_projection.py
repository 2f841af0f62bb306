"""A projection over the test-only events of tests/sample_events.py.

`things` holds one row a thing; `applied` counts how often a handler ran for it,
an UPDATE that is not idempotent on purpose, so applying an event twice shows.
"""

import uuid
from collections.abc import Sequence

from projectors.framework import Projection, ProjectionTx
from shared.event_store import NO_STREAM, EventMetadata, EventStore, RecordedEvent
from shared.events.registry import DomainEvent
from tests.sample_events import ThingHappened, sample_events


class ThingNoted(DomainEvent):
    """An event the sample projection does not handle unless a test says so."""

    note: str


sample_events.register(ThingNoted, "ThingNoted", version=1)


def make_projection(name: str = "things") -> Projection:
    projection = Projection(
        name=name,
        tables={
            "things": "stream_id text PRIMARY KEY, name text NOT NULL,"
            " size integer NOT NULL, applied integer NOT NULL, last_position bigint"
        },
        indexes={"things": ["name"]},
    )

    @projection.handles_batch("ThingHappened")
    async def add_things(tx: ProjectionTx, events: Sequence[RecordedEvent]) -> None:
        await tx.connection.exec_driver_sql(
            f"INSERT INTO {tx.table('things')}"
            " (stream_id, name, size, applied, last_position)"
            " SELECT s, n, z, 1, p FROM unnest(%s::text[], %s::text[], %s::int[],"
            " %s::bigint[]) AS t(s, n, z, p)"
            " ON CONFLICT (stream_id) DO UPDATE SET name = excluded.name,"
            f" size = excluded.size, applied = {tx.table('things')}.applied + 1,"
            " last_position = excluded.last_position",
            (
                [e.stream_id for e in events],
                [e.data["name"] for e in events],
                [e.data["size"] for e in events],
                [e.position for e in events],
            ),
        )

    @projection.handles("ThingRenamed")
    async def rename_thing(tx: ProjectionTx, event: RecordedEvent) -> None:
        await tx.connection.exec_driver_sql(
            f"UPDATE {tx.table('things')} SET name = %s, applied = applied + 1,"
            " last_position = %s WHERE stream_id = %s",
            (event.data["new_name"], event.position, event.stream_id),
        )

    return projection


def make_sql_projection(name: str = "things") -> Projection:
    """The same read table as `make_projection`, built by SQL handlers."""
    projection = Projection(
        name=name,
        tables={
            "things": "stream_id text PRIMARY KEY, name text NOT NULL,"
            " size integer NOT NULL, applied integer NOT NULL, last_position bigint"
        },
        indexes={"things": ["name"]},
    )

    @projection.handles_sql("ThingHappened")
    def add_things(tx: ProjectionTx) -> str:
        # Schema version 1 called the size "count".
        return (
            f"INSERT INTO {tx.table('things')} AS t"
            " (stream_id, name, size, applied, last_position)"
            " SELECT stream_id, data->>'name',"
            " coalesce((data->>'size')::int, (data->>'count')::int, 0), 1, position"
            f" FROM {tx.batch}"
            " ON CONFLICT (stream_id) DO UPDATE SET name = excluded.name,"
            " size = excluded.size, applied = t.applied + 1,"
            " last_position = excluded.last_position"
        )

    @projection.handles_sql("ThingRenamed")
    def rename_things(tx: ProjectionTx) -> str:
        return (
            f"UPDATE {tx.table('things')} AS t SET name = b.data->>'new_name',"
            " applied = t.applied + 1, last_position = b.position"
            f" FROM (SELECT DISTINCT ON (stream_id) * FROM {tx.batch}"
            " ORDER BY stream_id, position DESC) b WHERE t.stream_id = b.stream_id"
        )

    return projection


async def append_things(
    store: EventStore, count: int, *, noted_at: int | None = None
) -> list[str]:
    """Append `count` things, one stream each; a ThingNoted after the `noted_at`th."""
    streams = []
    for index in range(count):
        stream = f"thing-{uuid.uuid4()}"
        await store.append(
            stream,
            [ThingHappened(name=f"t{index}", size=index)],
            expected_version=NO_STREAM,
            metadata=EventMetadata(source="tests"),
        )
        streams.append(stream)
        if index == noted_at:
            await store.append(
                f"note-{uuid.uuid4()}",
                [ThingNoted(note="stop here")],
                expected_version=NO_STREAM,
                metadata=EventMetadata(source="tests"),
            )
    return streams
