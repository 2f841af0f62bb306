"""What a worker process holds: its own event loop, engine, event store and runner.

Celery forks its pool processes from the parent, and neither an event loop nor
database connections survive a fork, so each process (each thread, for the thread
pool) builds its own on first use, after the fork.
"""

import asyncio
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import uvloop
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import create_engine
from shared.event_store import EventStore
from shared.jobs import load_catalog
from shared.settings import Settings, get_settings
from workers.runner import JobRunner

T = TypeVar("T")
POOL_SIZE = 4


@dataclass
class Runtime:
    pid: int
    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    runner: JobRunner

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.dispose())
        self.runner.executor.shutdown(wait=False, cancel_futures=True)
        self.loop.close()


_local = threading.local()


def current_runtime(settings: Settings | None = None) -> Runtime:
    runtime: Runtime | None = getattr(_local, "runtime", None)
    if runtime is None or runtime.pid != os.getpid():
        runtime = _build(settings or get_settings())
        _local.runtime = runtime
    return runtime


def close_runtime() -> None:
    runtime: Runtime | None = getattr(_local, "runtime", None)
    if runtime is not None and runtime.pid == os.getpid():
        runtime.close()
    _local.runtime = None


def _build(settings: Settings) -> Runtime:
    loop = uvloop.new_event_loop()
    engine = create_engine(settings, pool_size=POOL_SIZE)
    runner = JobRunner(
        engine=engine,
        store=EventStore(engine),
        catalog=load_catalog(),
        settings=settings,
    )
    return Runtime(os.getpid(), loop, engine, runner)
