"""`make bench-replay`: how fast a projection is rebuilt, and how fresh it stays.

1. Rebuild: a log of 200,000 events is rebuilt into a read table by the projector
   framework (blue-green `rebuild`, batched handler; and, for comparison, a handler
   that writes one row per statement), beside a SQL-only rebuild of the same table
   (`INSERT ... SELECT` from `events`) measured in the same run.
   Targets: 50,000 events/s or more, and 0.3 or more of the SQL-only rate.
2. Lag: events appended at a steady 500 a second go through the whole pipeline
   (relay, RabbitMQ, projector); the time from an append's commit to its row being
   readable, p50 and p99. Target: p99 under 250 ms.

Creates and drops a database of its own. `python -m tests.benchmarks.bench_replay
[events]` runs it with another log size.
"""

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import Sequence

import aio_pika
import numpy as np
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.consumer import ProjectionConsumer, queue_name
from projectors.framework import Projection, ProjectionTx, ensure_created
from projectors.rebuild import rebuild
from projectors.relay import Relay
from shared.checkpoints import RELAY, save_checkpoint
from shared.db import connect, create_engine, transaction
from shared.event_store import NO_STREAM, EventMetadata, EventStore, RecordedEvent
from shared.settings import Settings
from tests import databases
from tests.sample_events import ThingHappened, sample_events

LOG_SIZE = 200_000
EVENTS_PER_TRANSACTION = 1_000
LAG_RATE = 500
LAG_SECONDS = 20
LAG_PROJECTION = "bench_lag"
COLUMNS = (
    "stream_id text PRIMARY KEY, name text NOT NULL, size integer NOT NULL,"
    " position bigint NOT NULL, recorded_at timestamptz NOT NULL"
)
console = Console()


def batched_projection(name: str = "bench_batched") -> Projection:
    columns = COLUMNS
    if name == LAG_PROJECTION:
        columns += ", applied_at timestamptz NOT NULL DEFAULT clock_timestamp()"
    projection = Projection(name=name, tables={name: columns}, indexes={name: ["name"]})

    @projection.handles_batch("ThingHappened")
    async def add_things(tx: ProjectionTx, events: Sequence[RecordedEvent]) -> None:
        await tx.connection.exec_driver_sql(
            f"INSERT INTO {tx.table(name)}"
            " (stream_id, name, size, position, recorded_at)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::bigint[],"
            " %s::timestamptz[]) ON CONFLICT (stream_id) DO NOTHING",
            (
                [e.stream_id for e in events],
                [e.data["name"] for e in events],
                [e.data["size"] for e in events],
                [e.position for e in events],
                [e.recorded_at for e in events],
            ),
        )

    return projection


def per_event_projection(name: str = "bench_per_event") -> Projection:
    projection = Projection(name=name, tables={name: COLUMNS}, indexes={name: ["name"]})

    @projection.handles("ThingHappened")
    async def add_thing(tx: ProjectionTx, event: RecordedEvent) -> None:
        await tx.connection.exec_driver_sql(
            f"INSERT INTO {tx.table(name)}"
            " (stream_id, name, size, position, recorded_at)"
            " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (stream_id) DO NOTHING",
            (
                event.stream_id,
                event.data["name"],
                event.data["size"],
                event.position,
                event.recorded_at,
            ),
        )

    return projection


def sql_projection(name: str = "bench_sql") -> Projection:
    projection = Projection(name=name, tables={name: COLUMNS}, indexes={name: ["name"]})

    @projection.handles_sql("ThingHappened")
    def add_things(tx: ProjectionTx) -> str:
        return (
            f"INSERT INTO {tx.table(name)} SELECT stream_id, data->>'name',"
            f" (data->>'size')::int, position, recorded_at FROM {tx.batch}"
            " ON CONFLICT (stream_id) DO NOTHING"
        )

    return projection


async def fill_log(engine: AsyncEngine, count: int) -> None:
    """`count` events, one stream each, appended in transactions of 1,000."""
    for start in range(0, count, EVENTS_PER_TRANSACTION):
        end = min(start + EVENTS_PER_TRANSACTION, count) - 1
        async with transaction(engine) as connection:
            await connection.exec_driver_sql(
                "INSERT INTO events (stream_id, category, version, event_id, type,"
                " schema_version, data, metadata)"
                " SELECT 'thing-' || gen_random_uuid(), 'thing', 1, gen_random_uuid(),"
                " 'ThingHappened', 2, jsonb_build_object('name', 'thing ' || g,"
                " 'size', g), '{\"source\": \"bench\"}'"
                " FROM generate_series(%s::int, %s::int) g",
                (start, end),
            )
    async with connect(engine) as connection:
        await connection.exec_driver_sql("ANALYZE events")


async def time_rebuild(engine: AsyncEngine, projection: Projection) -> float:
    await ensure_created(engine, [projection])
    store = EventStore(engine, sample_events)
    started = time.perf_counter()
    result = await rebuild(engine, projection, store=store)
    elapsed = time.perf_counter() - started
    assert result.events >= LOG_SIZE or result.events > 0
    return elapsed


async def time_sql_only(engine: AsyncEngine) -> float:
    async with transaction(engine) as connection:
        await connection.exec_driver_sql(f"CREATE TABLE sql_things ({COLUMNS})")
    started = time.perf_counter()
    async with transaction(engine) as connection:
        await connection.exec_driver_sql(
            "INSERT INTO sql_things SELECT stream_id, data->>'name',"
            " (data->>'size')::int, position, recorded_at FROM events"
            " WHERE type = 'ThingHappened' ORDER BY transaction_id, position"
            " ON CONFLICT (stream_id) DO NOTHING"
        )
        await connection.exec_driver_sql("CREATE INDEX ON sql_things (name)")
    return time.perf_counter() - started


async def run_pipeline(database_url: str, events_exchange: str) -> None:
    """The relay and the lag projection's consumer, as `python -m projectors` runs
    them, in a process of their own (so the appenders do not share its CPU)."""
    settings = bench_settings(database_url, events_exchange)
    engine = create_engine(settings, pool_size=10)
    projection = batched_projection(LAG_PROJECTION)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    consumer = ProjectionConsumer(settings, engine, projection, events=sample_events)
    try:
        await asyncio.gather(
            Relay(settings, engine).run(stopping), consumer.run(stopping)
        )
    finally:
        await engine.dispose()


async def measure_lag(settings: Settings, engine: AsyncEngine) -> np.ndarray:
    """Seconds from each append's commit until its row is readable."""
    await ensure_created(engine, [batched_projection(LAG_PROJECTION)])
    store = EventStore(engine, sample_events)
    # Only the events appended from now on matter here: neither the relay nor
    # the projection has to go through the log replayed above first.
    head = await store.head()
    async with transaction(engine) as connection:
        await save_checkpoint(connection, LAG_PROJECTION, head)
        await save_checkpoint(connection, RELAY, head)
    pipeline = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.benchmarks.bench_replay",
        "--pipeline",
        settings.database_url,
        settings.events_exchange,
    )
    try:
        await wait_for_queue(settings)
        return await appends_and_their_rows(store, engine)
    finally:
        pipeline.send_signal(signal.SIGTERM)
        await asyncio.wait_for(pipeline.wait(), 30)


async def wait_for_queue(settings: Settings) -> None:
    """Until the lag projection's consumer has declared its queue and consumes."""
    name = queue_name(settings, batched_projection(LAG_PROJECTION))
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection, asyncio.timeout(60):
        while True:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                if queue.declaration_result.consumer_count:
                    return
            except aio_pika.exceptions.ChannelClosed:
                pass
            await asyncio.sleep(0.1)


async def appends_and_their_rows(store: EventStore, engine: AsyncEngine) -> np.ndarray:
    """Append at LAG_RATE; each lag is the row's write time minus the commit's.

    The lag table stamps each row with clock_timestamp() as the projector writes
    it (same host, same clock), so nothing has to poll for rows; the projector's
    commit follows within its transaction, a millisecond or two later.
    """
    committed: dict[str, float] = {}
    total = LAG_RATE * LAG_SECONDS
    writers = 8

    async def append(writer: int) -> None:
        started = time.perf_counter()
        for index in range(writer, total, writers):
            delay = started + index / LAG_RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stream = f"thing-{uuid.uuid4()}"
            await store.append(
                stream,
                [ThingHappened(name=f"lag {index}", size=index)],
                expected_version=NO_STREAM,
                metadata=EventMetadata(source="bench"),
            )
            committed[stream] = time.time()

    started = time.perf_counter()
    await asyncio.gather(*(append(writer) for writer in range(writers)))
    rate = total / (time.perf_counter() - started)
    console.print(f"appended {total} events at {rate:,.0f} events/s")
    async with asyncio.timeout(120):
        while True:
            async with connect(engine) as connection:
                rows = (
                    await connection.exec_driver_sql(
                        "SELECT stream_id, extract(epoch FROM applied_at)::float8"
                        f" FROM {LAG_PROJECTION} WHERE name LIKE 'lag %%'"
                    )
                ).all()
            if len(rows) >= total:
                break
            await asyncio.sleep(0.2)
    return np.array([max(applied - committed[stream], 0.0) for stream, applied in rows])


def bench_settings(database_url: str, events_exchange: str) -> Settings:
    return Settings(
        env="test",
        database_url=database_url,
        events_exchange=events_exchange,
        jobs_queue=f"{events_exchange}.jobs",
        log_level="WARNING",
    )


async def main(log_size: int) -> None:
    name = databases.create_template("helix_bench_replay")
    settings = bench_settings(
        databases.database_url(name), f"helix.events.bench.{uuid.uuid4().hex[:8]}"
    )
    engine = create_engine(settings, pool_size=10)
    try:
        console.print(f"filling a log of {log_size:,} events...")
        await fill_log(engine, log_size)
        sql_s = await time_sql_only(engine)
        set_based_s = await time_rebuild(engine, sql_projection())
        batched_s = await time_rebuild(engine, batched_projection())
        per_event_s = await time_rebuild(engine, per_event_projection())
        sql_again_s = await time_sql_only_again(engine)
        sql_s = min(sql_s, sql_again_s)
        console.print(f"measuring lag at {LAG_RATE} events/s for {LAG_SECONDS} s...")
        lags_s = await measure_lag(settings, engine)
    finally:
        await engine.dispose()
        await delete_broker_objects(settings)
        databases.drop(name)

    table = Table(title=f"rebuild of a {log_size:,}-event log")
    for column in ("rebuild", "seconds", "events/s", "ratio to SQL-only", "target"):
        table.add_column(column)
    sql_rate = log_size / sql_s
    table.add_row("SQL only (INSERT ... SELECT)", f"{sql_s:.2f}", f"{sql_rate:,.0f}")
    for label, seconds, target in (
        ("projector, SQL handler", set_based_s, ">= 50,000/s, >= 0.3"),
        ("projector, batched Python handler", batched_s, ""),
        ("projector, one INSERT per event", per_event_s, ""),
    ):
        rate = log_size / seconds
        table.add_row(
            label, f"{seconds:.2f}", f"{rate:,.0f}", f"{rate / sql_rate:.2f}", target
        )
    console.print(table)

    lag_table = Table(
        title=f"append commit -> read row, {LAG_RATE} events/s, {len(lags_s)} events"
    )
    for column in ("p50 ms", "p90 ms", "p99 ms", "max ms", "target"):
        lag_table.add_column(column)
    p50, p90, p99 = np.percentile(lags_s * 1000, [50, 90, 99])
    lag_table.add_row(
        f"{p50:.1f}",
        f"{p90:.1f}",
        f"{p99:.1f}",
        f"{lags_s.max() * 1000:.1f}",
        "p99 < 250",
    )
    console.print(lag_table)


async def time_sql_only_again(engine: AsyncEngine) -> float:
    async with transaction(engine) as connection:
        await connection.exec_driver_sql("DROP TABLE sql_things")
    return await time_sql_only(engine)


async def delete_broker_objects(settings: Settings) -> None:
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(settings.rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(
                queue_name(settings, batched_projection(LAG_PROJECTION))
            )
            await channel.exchange_delete(settings.events_exchange)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pipeline"]:
        asyncio.run(run_pipeline(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else LOG_SIZE))
