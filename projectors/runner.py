"""`python -m projectors`: the relay, every projection and the job dispatcher."""

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from projectors.consumer import ProjectionConsumer
from projectors.dispatcher import run_dispatcher
from projectors.framework import Projection, ensure_created
from projectors.projections import discover
from projectors.rebuild import rebuild
from projectors.relay import Relay
from shared.db import create_engine
from shared.event_store import EventStore
from shared.events import registry
from shared.settings import Settings

log = logging.getLogger(__name__)


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
        stale = await ensure_created(engine, projections)
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
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            stopping.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                raise result
    finally:
        await engine.dispose()
