"""`make bench-store`: append throughput of the event store beside raw psycopg.

Each scenario appends through EventStore, then inserts the same rows with plain
psycopg into a table of the same shape and indexes (`raw_events`), in the same run,
alternating, and keeps the best of a few rounds of each.
"""

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psycopg
from rich.console import Console
from rich.table import Table

from shared.db import create_engine
from shared.event_store import EventMetadata, EventStore
from tests import databases
from tests.sample_events import ThingHappened, sample_events
from tests.stack import settings_for

ROUNDS = 3
META = EventMetadata(source="bench", correlation_id="bench")
RAW_INSERT = (
    "INSERT INTO raw_events (stream_id, category, version, event_id, type,"
    " schema_version, data, metadata) VALUES (%s, 'thing', %s, %s, 'ThingHappened',"
    " 2, %s, %s)"
)


@dataclass(frozen=True)
class Scenario:
    name: str
    writers: int
    appends_per_writer: int
    events_per_append: int

    @property
    def events(self) -> int:
        return self.writers * self.appends_per_writer * self.events_per_append


SCENARIOS = [
    Scenario("single-event commits, 1 writer", 1, 1500, 1),
    Scenario("single-event commits, 16 writers", 16, 250, 1),
    Scenario("100-event batches, 1 writer", 1, 300, 100),
    Scenario("100-event batches, 4 writers", 4, 100, 100),
]


async def store_writer(store: EventStore, scenario: Scenario) -> None:
    stream = f"thing-{uuid.uuid4()}"
    version = 0
    for i in range(scenario.appends_per_writer):
        events = [
            ThingHappened(name=f"item-{i}-{j}", size=j)
            for j in range(scenario.events_per_append)
        ]
        await store.append(stream, events, expected_version=version, metadata=META)
        version += len(events)


async def raw_writer(dsn: str, scenario: Scenario) -> None:
    stream = f"thing-{uuid.uuid4()}"
    metadata = META.model_dump_json(exclude_none=True)
    version = 0
    # A single row needs no transaction block: one autocommitted INSERT is the
    # cheapest way to commit it, and the fairest baseline.
    single = scenario.events_per_append == 1
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=single
    ) as connection:
        for i in range(scenario.appends_per_writer):
            rows = []
            for j in range(scenario.events_per_append):
                version += 1
                data = json.dumps({"name": f"item-{i}-{j}", "size": j})
                rows.append((stream, version, uuid.uuid4(), data, metadata))
            if single:
                await connection.execute(RAW_INSERT, rows[0])
                continue
            async with connection.transaction(), connection.cursor() as cursor:
                await cursor.executemany(RAW_INSERT, rows)


async def rate(run: Callable[[], Awaitable[object]], events: int) -> float:
    started = time.perf_counter()
    await run()
    return events / (time.perf_counter() - started)


async def main() -> None:
    name = databases.create_template("helix_bench_store")
    settings = settings_for(databases.database_url(name), database_pool_size=20)
    engine = create_engine(settings)
    store = EventStore(engine, sample_events)
    dsn = settings.psycopg_dsn
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(
            "CREATE TABLE raw_events (LIKE events INCLUDING DEFAULTS INCLUDING"
            " IDENTITY INCLUDING CONSTRAINTS INCLUDING INDEXES)"
        )
    table = Table(title="event store appends (events/s, best of 3 rounds)")
    for column in ("scenario", "events", "EventStore", "raw psycopg", "ratio"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    try:
        for scenario in SCENARIOS:
            store_best = raw_best = 0.0
            for _ in range(ROUNDS):
                store_best = max(
                    store_best,
                    await rate(
                        lambda s=scenario: asyncio.gather(
                            *(store_writer(store, s) for _ in range(s.writers))
                        ),
                        scenario.events,
                    ),
                )
                raw_best = max(
                    raw_best,
                    await rate(
                        lambda s=scenario: asyncio.gather(
                            *(raw_writer(dsn, s) for _ in range(s.writers))
                        ),
                        scenario.events,
                    ),
                )
            table.add_row(
                scenario.name,
                str(scenario.events),
                f"{store_best:,.0f}",
                f"{raw_best:,.0f}",
                f"{store_best / raw_best:.2f}",
            )
    finally:
        await engine.dispose()
        databases.drop(name)
    Console().print(table)
    print(
        "targets: 16 writers single-event ratio >= 0.80;"
        " 100-event batches >= 50,000 events/s"
    )


if __name__ == "__main__":
    asyncio.run(main())
