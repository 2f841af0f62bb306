"""`python -m projectors`: the relay, every projection and the job dispatcher."""

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.consumer import ProjectionConsumer
from projectors.dispatcher import run_dispatcher
from projectors.framework import Projection, ensure_created
from projectors.projections import discover
from projectors.rebuild import rebuild
from projectors.relay import Relay
from shared.db import create_engine, is_unavailable
from shared.errors import StoreUnavailable
from shared.event_store import EventStore
from shared.events import registry
from shared.settings import Settings

log = logging.getLogger(__name__)

# Docker waits 10 s after SIGTERM before it kills.
STOP_GRACE_S = 5.0
MAX_START_DELAY_S = 5.0


async def run(
    settings: Settings,
    stopping: asyncio.Event,
    *,
    projections: Sequence[Projection] | None = None,
) -> None:
    """Run until `stopping` is set; a component that fails for good stops the rest.

    Projections whose tables no longer match their definition are rebuilt (blue-
    green, the old tables serving meanwhile) before their consumer starts.
    """
    projections = discover() if projections is None else projections
    # Nothing here appends events: every write can be redone from the log.
    engine = create_engine(settings, durable=False)
    try:
        stale = await _ensure_created(engine, projections, stopping)
        if stale is None:
            return
        store = EventStore(engine, registry)

        async def project(projection: Projection) -> None:
            if projection in stale:
                log.info(
                    "rebuilding stale projection", extra={"projection": projection.name}
                )
                try:
                    await rebuild(engine, projection, store=store)
                except Exception:
                    # The old tables keep serving; `helix projections rebuild`
                    # can finish the job (it resumes the generation built so far).
                    log.exception(
                        "rebuild failed", extra={"projection": projection.name}
                    )
            await ProjectionConsumer(settings, engine, projection).run(stopping)

        components: list[Coroutine[Any, Any, None]] = [
            Relay(settings, engine).run(stopping),
            *(project(projection) for projection in projections),
            run_dispatcher(settings, stopping),
        ]
        tasks = [asyncio.create_task(component) for component in components]
        log.info(
            "projectors running",
            extra={"projections": [p.name for p in projections]},
        )
        told_to_stop = asyncio.create_task(stopping.wait())
        try:
            # Components return only once told to stop, or raise if they fail.
            await asyncio.wait(
                [*tasks, told_to_stop], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.set()
            told_to_stop.cancel()
            await _stop(tasks)
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                raise result
    finally:
        await engine.dispose()


async def _ensure_created(
    engine: AsyncEngine, projections: Sequence[Projection], stopping: asyncio.Event
) -> list[Projection] | None:
    """The projections' tables, once PostgreSQL answers; None if told to stop first.

    A process started while PostgreSQL is down (or restarting with it) waits
    for it, as its components do later, rather than exiting.
    """
    delay_s = 0.5
    while not stopping.is_set():
        try:
            return await ensure_created(engine, projections)
        except Exception as exc:
            if not (isinstance(exc, StoreUnavailable) or is_unavailable(exc)):
                raise
            log.warning(
                "PostgreSQL is unavailable; waiting for it",
                extra={"retry_in_s": delay_s},
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay_s)
        delay_s = min(delay_s * 2, MAX_START_DELAY_S)
    return None


async def _stop(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Give the components STOP_GRACE_S to finish, then cancel the rest.

    A long catch-up or rebuild does not look at the stop signal between its
    batches; cancelled, its open batch rolls back and the next start resumes
    from the checkpoint.
    """
    _, slow = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
    for task in slow:
        log.warning("cancelling a component that did not stop in time")
        task.cancel()
