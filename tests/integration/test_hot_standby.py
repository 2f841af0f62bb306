"""The query side on a PostgreSQL hot standby, as DESIGN.md plans for scaling out.

A real primary and a real standby streaming from it (tests/standby.py). Replay is
paused to make the standby trail its primary on demand.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.framework import catch_up, ensure_created
from query_api.job_waits import RECHECK_S, STANDBY_RECHECK_S, JobWaits
from shared.checkpoints import lag_check, replay_lag, wait_until_processed
from shared.db import create_engine
from shared.errors import ValidationFailed
from shared.event_store import NO_STREAM, EventMetadata, EventStore
from tests.sample_events import ThingHappened, sample_events
from tests.sample_projection import make_projection
from tests.stack import settings_for
from tests.standby import Pair

META = EventMetadata(source="tests")


@pytest.fixture
async def primary(standby_pair: Pair) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings_for(standby_pair.primary_url), pool_size=2)
    yield engine
    await engine.dispose()


@pytest.fixture
async def standby(standby_pair: Pair) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings_for(standby_pair.standby_url), pool_size=2)
    yield engine
    await engine.dispose()


async def eventually(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


async def add_things(store: EventStore, count: int) -> int:
    """Append `count` things, one stream each; the last one's position."""
    for i in range(count):
        result = await store.append(
            f"thing-{uuid.uuid4()}",
            [ThingHappened(name=f"t{i}")],
            expected_version=NO_STREAM,
            metadata=META,
        )
    return result.last_position


async def test_a_position_the_standby_has_yet_to_replay_is_waited_for_not_refused(
    standby_pair, primary, standby
):
    projection = make_projection()
    await ensure_created(primary, [projection])
    store = EventStore(primary, sample_events)
    with standby_pair.replay_paused():
        # More positions than a sequence logs ahead, so the standby's copy of
        # the sequence is behind as well.
        position = await add_things(store, 40)
        target = await store.locate(position)
        assert target is not None
        assert await catch_up(primary, projection, store=store, until=target) >= target
        assert not await wait_until_processed(
            standby, ["things"], position, timeout_s=0.3
        )
        # The primary knows that this one was never handed out.
        with pytest.raises(ValidationFailed, match="past the end of the log"):
            await wait_until_processed(primary, ["things"], position + 1, timeout_s=0.1)
    # Replayed, the standby's checkpoint shows the projection has it.
    assert await wait_until_processed(standby, ["things"], position, timeout_s=10)


async def test_health_fails_on_a_standby_far_behind_its_primary(
    standby_pair, primary, standby
):
    assert await replay_lag(primary) is None
    store = EventStore(primary, sample_events)
    await add_things(store, 1)
    await eventually(lambda: _lag_is(standby, lambda lag: lag == 0))
    with standby_pair.replay_paused():
        await asyncio.sleep(1.2)
        await add_things(store, 1)
        await eventually(lambda: _lag_is(standby, lambda lag: lag > 1))
        with pytest.raises(
            RuntimeError, match="hot standby may be .* behind its primary"
        ):
            await lag_check(standby, max_lag_s=1)()
    await eventually(lambda: _lag_is(standby, lambda lag: lag == 0))


async def _lag_is(engine: AsyncEngine, test: Callable[[float], bool]) -> bool:
    lag = await replay_lag(engine)
    return lag is not None and bool(test(lag))


async def test_job_waits_on_a_standby_poll_instead_of_listening(standby_pair, caplog):
    caplog.set_level(logging.INFO, logger="shared.log_listener")
    waits = JobWaits(standby_pair.dsn(standby_pair.standby_port), standby_retry_s=0.1)
    try:
        with waits.watch(uuid.uuid4()):
            await eventually(_returns(lambda: waits.on_standby))
            assert waits.recheck_s == STANDBY_RECHECK_S
            await asyncio.sleep(0.5)  # several more tries to LISTEN
    finally:
        await waits.stop()
    said = [r for r in caplog.records if r.name == "shared.log_listener"]
    # Said once, as a fact about the deployment, not a warning a second.
    assert [r.levelname for r in said] == ["INFO"]
    assert "hot standby" in said[0].getMessage()

    waits = JobWaits(standby_pair.dsn(standby_pair.primary_port))
    try:
        with waits.watch(uuid.uuid4()) as woken:
            # Listening wakes every waiter once: changes may have been missed.
            await asyncio.wait_for(woken.wait(), 10)
            assert not waits.on_standby
            assert waits.recheck_s == RECHECK_S
    finally:
        await waits.stop()


def _returns(value: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return bool(value())

    return condition


async def test_a_standby_cut_off_from_its_primary_is_behind_not_caught_up(
    standby_pair, primary, standby
):
    store = EventStore(primary, sample_events)
    await add_things(store, 1)
    await eventually(lambda: _lag_is(standby, lambda lag: lag == 0))
    await asyncio.sleep(1.2)
    with standby_pair.primary_stopped():
        # It replayed all it received: only its lost stream tells it is stale.
        await eventually(lambda: _lag_is(standby, lambda lag: lag > 1))
        with pytest.raises(RuntimeError, match="hot standby may be"):
            await lag_check(standby, max_lag_s=1)()
    await primary.dispose()
    await eventually(lambda: _lag_is(standby, lambda lag: lag == 0), timeout_s=30)
