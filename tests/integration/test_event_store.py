"""The event store's contract, against a real PostgreSQL."""

import asyncio
import json
import time
import uuid

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import connect_options, create_engine, transaction
from shared.errors import (
    DuplicateEventId,
    InvalidEventData,
    StoreUnavailable,
    UnknownEventType,
    ValidationFailed,
    WrongExpectedVersion,
)
from shared.event_store import (
    ANY_VERSION,
    LOG_START,
    NO_STREAM,
    EventMetadata,
    EventStore,
    LogPosition,
)
from shared.events.registry import DomainEvent
from shared.log_listener import LogListener
from shared.settings import Settings
from tests.horizon import wait_until_readable
from tests.sample_events import ThingHappened, ThingRenamed, sample_events

META = EventMetadata(source="tests", correlation_id="req-1")


@pytest.fixture
def things(engine: AsyncEngine) -> EventStore:
    return EventStore(engine, sample_events)


def new_stream() -> str:
    return f"thing-{uuid.uuid4()}"


async def test_appended_events_read_back_in_version_order_with_metadata(things):
    stream = new_stream()
    actor = uuid.uuid4()
    meta = EventMetadata(source="tests", actor_id=actor, correlation_id="req-9")
    result = await things.append(
        stream,
        [ThingHappened(name="a", size=1), ThingRenamed(old_name="a", new_name="b")],
        expected_version=NO_STREAM,
        metadata=meta,
    )

    events = await things.read_stream(stream)

    assert result.version == 2
    assert [e.position for e in events] == result.positions
    assert [(e.version, e.type) for e in events] == [
        (1, "ThingHappened"),
        (2, "ThingRenamed"),
    ]
    assert events[0].category == "thing"
    assert events[1].data == {"old_name": "a", "new_name": "b"}
    assert events[0].metadata == {
        "source": "tests",
        "actor_id": str(actor),
        "correlation_id": "req-9",
    }
    assert events[1].event(sample_events) == ThingRenamed(old_name="a", new_name="b")
    assert [e.version for e in await things.read_stream(stream, from_version=2)] == [2]


async def test_second_writer_with_same_expected_version_gets_conflict(things):
    stream = new_stream()
    await things.append(
        stream, [ThingHappened(name="a")], expected_version=NO_STREAM, metadata=META
    )
    await things.append(
        stream, [ThingHappened(name="b")], expected_version=1, metadata=META
    )

    with pytest.raises(WrongExpectedVersion) as caught:
        await things.append(
            stream, [ThingHappened(name="c")], expected_version=1, metadata=META
        )

    assert caught.value.actual == 2
    assert await things.stream_version(stream) == 2


async def test_expected_version_ahead_of_the_stream_is_a_conflict(things):
    stream = new_stream()
    with pytest.raises(WrongExpectedVersion):
        await things.append(
            stream, [ThingHappened(name="a")], expected_version=3, metadata=META
        )
    assert await things.read_stream(stream) == []


async def test_any_version_appends_at_the_end(things):
    stream = new_stream()
    for name in "abc":
        await things.append(
            stream,
            [ThingHappened(name=name)],
            expected_version=ANY_VERSION,
            metadata=META,
        )
    assert [e.version for e in await things.read_stream(stream)] == [1, 2, 3]


async def test_of_two_racing_writers_exactly_one_wins(things):
    for _ in range(20):
        stream = new_stream()
        await things.append(
            stream, [ThingHappened(name="0")], expected_version=NO_STREAM, metadata=META
        )

        outcomes = await asyncio.gather(
            *(
                things.append(
                    stream,
                    [ThingHappened(name=str(i))],
                    expected_version=1,
                    metadata=META,
                )
                for i in range(2)
            ),
            return_exceptions=True,
        )

        conflicts = [o for o in outcomes if isinstance(o, WrongExpectedVersion)]
        assert len(conflicts) == 1, outcomes
        assert len(await things.read_stream(stream)) == 2


async def test_reappending_stored_event_ids_returns_the_original_positions(things):
    stream = new_stream()
    ids = [uuid.uuid4(), uuid.uuid4()]
    events = [ThingHappened(name="a"), ThingHappened(name="b")]
    first = await things.append(
        stream, events, expected_version=NO_STREAM, metadata=META, event_ids=ids
    )

    again = await things.append(
        stream, events, expected_version=NO_STREAM, metadata=META, event_ids=ids
    )

    assert again.positions == first.positions
    assert again.already_stored
    assert len(await things.read_stream(stream)) == 2


async def test_concurrent_retries_of_one_append_store_it_once(things):
    stream = new_stream()
    ids = [uuid.uuid4()]
    results = await asyncio.gather(
        *(
            things.append(
                stream,
                [ThingHappened(name="a")],
                expected_version=ANY_VERSION,
                metadata=META,
                event_ids=ids,
            )
            for _ in range(4)
        )
    )
    assert {r.last_position for r in results} == {results[0].last_position}
    assert len(await things.read_stream(stream)) == 1


async def test_event_id_reused_on_another_stream_is_refused(things):
    event_id = uuid.uuid4()
    await things.append(
        new_stream(),
        [ThingHappened(name="a")],
        expected_version=NO_STREAM,
        metadata=META,
        event_ids=[event_id],
    )
    other = new_stream()
    with pytest.raises(DuplicateEventId):
        await things.append(
            other,
            [ThingHappened(name="a")],
            expected_version=NO_STREAM,
            metadata=META,
            event_ids=[event_id],
        )
    assert await things.read_stream(other) == []


async def test_unknown_or_invalid_events_are_refused_before_any_sql():
    # The engine points at a port nothing listens on: touching it would raise
    # StoreUnavailable, so a validation error proves no SQL was attempted.
    dead = create_engine(
        Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    )
    store = EventStore(dead, sample_events)

    class NotRegistered(DomainEvent):
        x: int

    with pytest.raises(UnknownEventType):
        await store.append(
            new_stream(), [NotRegistered(x=1)], expected_version=None, metadata=META
        )
    unchecked = ThingHappened.model_construct(name=123, size="big")
    with pytest.raises(InvalidEventData):
        await store.append(
            new_stream(), [unchecked], expected_version=None, metadata=META
        )
    with pytest.raises(ValidationFailed):
        await store.append(
            "no stream id",
            [ThingHappened(name="a")],
            expected_version=None,
            metadata=META,
        )
    with pytest.raises(ValidationFailed):
        await store.append(new_stream(), [], expected_version=None, metadata=META)
    # Text PostgreSQL's jsonb cannot hold, or that is not Unicode at all.
    for name in ("a\x00b", "\ud800"):
        with pytest.raises(InvalidEventData):
            await store.append(
                new_stream(),
                [ThingHappened(name=name)],
                expected_version=None,
                metadata=META,
            )
    # A backslash and "u0000" spelled out are only text, and no NUL.
    assert store._encode(new_stream(), [ThingHappened(name="\\u0000")], META, None)
    await dead.dispose()


async def test_both_ends_probe_an_idle_connection(engine, settings):
    # So that a vanished worker or relay host loses its advisory locks within
    # about a minute, not after the kernel's default two hours.
    async with engine.connect() as connection:
        pooled = await connection.exec_driver_sql("SHOW tcp_keepalives_idle")
        assert pooled.scalar_one() == "30"
    direct = await psycopg.AsyncConnection.connect(
        settings.psycopg_dsn, autocommit=True, **connect_options(5)
    )
    async with direct:
        cursor = await direct.execute("SHOW tcp_keepalives_count")
        assert await cursor.fetchone() == ("3",)
        cursor = await direct.execute("SHOW tcp_user_timeout")
        assert await cursor.fetchone() == ("60000",)
        assert direct.info.get_parameters()["keepalives_idle"] == "30"
        assert direct.info.get_parameters()["tcp_user_timeout"] == "60000"


async def test_a_failed_statement_never_shows_its_values(engine):
    with pytest.raises(sa_exc.DBAPIError) as caught:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(
                "SELECT %(secret)s::text, 1 / 0", {"secret": "$argon2id$a-hash"}
            )

    assert "argon2id" not in str(caught.value)


async def test_a_down_database_gives_a_retryable_error_not_a_hang():
    dead = create_engine(
        Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    )
    store = EventStore(dead, sample_events)
    started = time.monotonic()

    with pytest.raises(StoreUnavailable) as caught:
        await store.append(
            new_stream(),
            [ThingHappened(name="a")],
            expected_version=None,
            metadata=META,
        )
    with pytest.raises(StoreUnavailable):
        await store.read_all()

    assert caught.value.retryable
    assert time.monotonic() - started < 30
    await dead.dispose()


async def test_events_and_command_rows_of_one_transaction_commit_or_fail_together(
    things, engine
):
    async with transaction(engine) as connection:
        await connection.exec_driver_sql(
            "CREATE TABLE reservations (email text PRIMARY KEY)"
        )
    stream = new_stream()

    with pytest.raises(RuntimeError):
        async with transaction(engine) as connection:
            await connection.exec_driver_sql(
                "INSERT INTO reservations VALUES ('a@example.com')"
            )
            await things.append(
                stream,
                [ThingHappened(name="a"), ThingHappened(name="b")],
                expected_version=NO_STREAM,
                metadata=META,
                connection=connection,
            )
            raise RuntimeError("the command failed after appending")

    async with transaction(engine) as connection:
        count = await connection.exec_driver_sql("SELECT count(*) FROM reservations")
        assert count.scalar_one() == 0
    assert await things.read_stream(stream) == []


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET data = '{}'::jsonb",
        "DELETE FROM events",
        "TRUNCATE events",
        "TRUNCATE events CASCADE",
    ],
)
async def test_the_database_refuses_to_change_stored_events(things, engine, statement):
    stream = new_stream()
    await things.append(
        stream, [ThingHappened(name="a")], expected_version=NO_STREAM, metadata=META
    )

    with pytest.raises(sa_exc.DBAPIError, match="events are immutable"):
        async with transaction(engine) as connection:
            await connection.exec_driver_sql(statement)

    [event] = await things.read_stream(stream)
    assert event.data == {"name": "a", "size": 0}


async def test_old_schema_versions_are_upcast_when_read(things, engine):
    stream = new_stream()
    async with transaction(engine) as connection:
        result = await connection.exec_driver_sql(
            "INSERT INTO events (stream_id, category, version, event_id, type,"
            " schema_version, data)"
            " VALUES (%s, 'thing', 1, %s, 'ThingHappened', 1, %s) RETURNING position",
            (stream, uuid.uuid4(), json.dumps({"name": "old", "count": 7})),
        )
        position = result.scalar_one()
    await wait_until_readable(things, position)

    [event] = await things.read_stream(stream)
    [from_log] = await things.read_all(categories=["thing"])

    assert event.schema_version == 2
    assert event.data == {"name": "old", "size": 7}
    assert event.event(sample_events) == ThingHappened(name="old", size=7)
    assert from_log.data == event.data


async def test_read_all_pages_through_the_log_in_batches(things):
    streams = [new_stream() for _ in range(5)]
    for stream in streams:
        result = await things.append(
            stream,
            [ThingHappened(name=str(i)) for i in range(5)],
            expected_version=NO_STREAM,
            metadata=META,
        )
    await wait_until_readable(things, result.last_position)

    batches, after = [], LOG_START
    while batch := await things.read_all(after, limit=7):
        batches.append(batch)
        after = batch[-1].log_position

    seen = [e for batch in batches for e in batch]
    assert [len(b) for b in batches] == [7, 7, 7, 4]
    assert [e.position for e in seen] == sorted(e.position for e in seen)
    assert [(e.stream_id, e.version) for e in seen] == [
        (s, v) for s in streams for v in range(1, 6)
    ]
    assert await things.head() == seen[-1].log_position
    assert await things.read_all(seen[-1].log_position) == []


async def test_read_all_filters_by_category_type_and_end(things):
    await things.append(
        new_stream(), [ThingHappened(name="a")], expected_version=None, metadata=META
    )
    result = await things.append(
        f"other-{uuid.uuid4()}",
        [ThingRenamed(old_name="a", new_name="b")],
        expected_version=None,
        metadata=META,
    )
    await wait_until_readable(things, result.last_position)
    everything = await things.read_all()

    assert [e.category for e in await things.read_all(categories=["other"])] == [
        "other"
    ]
    assert [e.type for e in await things.read_all(types=["ThingHappened"])] == [
        "ThingHappened"
    ]
    assert await things.read_all(until=everything[0].log_position) == everything[:1]
    assert await things.locate(everything[1].position) == everything[1].log_position
    assert await things.locate(10**12) is None


async def test_readers_wait_behind_a_transaction_that_is_still_open(things, engine):
    stream_slow, stream_fast = new_stream(), new_stream()
    async with transaction(engine) as slow:
        await things.append(
            stream_slow,
            [ThingHappened(name="slow")],
            expected_version=NO_STREAM,
            metadata=META,
            connection=slow,
        )
        fast = await things.append(
            stream_fast,
            [ThingHappened(name="fast")],
            expected_version=None,
            metadata=META,
        )
        # The later append has committed, but an earlier one is still open:
        # handing the later one out now would let a reader skip the earlier.
        assert await things.read_all() == []
        assert await things.head() == LOG_START

    await wait_until_readable(things, fast.last_position)
    seen = await things.read_all()
    assert [e.stream_id for e in seen] == [stream_slow, stream_fast]


async def test_listener_is_woken_when_events_commit(things, settings, engine):
    listener = LogListener(settings.psycopg_dsn)
    await listener.start()
    try:
        await listener.wait(timeout_s=5)  # the wake-up every new listener gets
        assert not await listener.wait(timeout_s=0.2)
        await things.append(
            new_stream(),
            [ThingHappened(name="a")],
            expected_version=None,
            metadata=META,
        )
        assert await listener.wait(timeout_s=5)
    finally:
        await listener.stop()


def test_log_positions_order_by_transaction_then_position():
    assert LogPosition(5, 100) < LogPosition(6, 1) < LogPosition(6, 2)
    assert LogPosition(1, 1) > LOG_START


async def test_an_append_the_server_refuses_fails_alone_in_its_batch(
    things, monkeypatch
):
    encode = things._encode
    refused = new_stream()

    def encode_with_a_nul(stream_id, events, metadata, event_ids):
        params = encode(stream_id, events, metadata, event_ids)
        if stream_id == refused:
            # What the checks before SQL missed: PostgreSQL refuses it.
            params["data"] = ['{"name": "\\u0000", "size": 0}']
        return params

    monkeypatch.setattr(things, "_encode", encode_with_a_nul)
    appends = [
        things.append(
            stream,
            [ThingHappened(name="ok")],
            expected_version=NO_STREAM,
            metadata=META,
        )
        for stream in [new_stream() for _ in range(20)]
    ]
    appends.insert(
        10,
        things.append(
            refused,
            [ThingHappened(name="x")],
            expected_version=NO_STREAM,
            metadata=META,
        ),
    )

    outcomes = await asyncio.gather(*appends, return_exceptions=True)

    failed = outcomes.pop(10)
    assert isinstance(failed, ValidationFailed)
    assert [type(o).__name__ for o in outcomes] == ["AppendResult"] * 20
    assert await things.read_stream(refused) == []


async def test_appends_committed_together_keep_their_own_outcomes(things):
    behind, fresh, repeated = new_stream(), new_stream(), new_stream()
    first, second = new_stream(), new_stream()
    await things.append(
        behind, [ThingHappened(name="a")], expected_version=NO_STREAM, metadata=META
    )
    stored_id = uuid.uuid4()
    original = await things.append(
        repeated,
        [ThingHappened(name="r")],
        expected_version=NO_STREAM,
        metadata=META,
        event_ids=[stored_id],
    )
    shared_id = uuid.uuid4()

    outcomes = await asyncio.gather(
        things.append(
            behind, [ThingHappened(name="b")], expected_version=0, metadata=META
        ),
        things.append(
            fresh,
            [ThingHappened(name="f1"), ThingHappened(name="f2")],
            expected_version=NO_STREAM,
            metadata=META,
        ),
        things.append(
            repeated,
            [ThingHappened(name="r")],
            expected_version=NO_STREAM,
            metadata=META,
            event_ids=[stored_id],
        ),
        things.append(
            first,
            [ThingHappened(name="x")],
            expected_version=None,
            metadata=META,
            event_ids=[shared_id],
        ),
        things.append(
            second,
            [ThingHappened(name="y")],
            expected_version=None,
            metadata=META,
            event_ids=[shared_id],
        ),
        return_exceptions=True,
    )

    conflict, created, again, *same_id = outcomes
    assert isinstance(conflict, WrongExpectedVersion)
    assert created.version == 2
    assert [e.version for e in await things.read_stream(fresh)] == [1, 2]
    assert again.already_stored and again.positions == original.positions
    # One event id offered to two streams at once: exactly one stream gets it.
    assert sorted(type(o).__name__ for o in same_id) == [
        "AppendResult",
        "DuplicateEventId",
    ]
    assert (
        len(await things.read_stream(first)) + len(await things.read_stream(second))
        == 1
    )
    assert [e.data["name"] for e in await things.read_stream(behind)] == ["a"]
