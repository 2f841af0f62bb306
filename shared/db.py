"""Database access: one async SQLAlchemy engine a process, on psycopg 3."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from shared.errors import StoreUnavailable
from shared.settings import Settings


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_size=pool_size or settings.database_pool_size,
        max_overflow=0,
        pool_timeout=settings.database_connect_timeout_s * 2,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": max(1, int(settings.database_connect_timeout_s)),
            "application_name": "helixnet-core",
        },
    )


def is_unavailable(exc: BaseException) -> bool:
    """Whether a driver error means PostgreSQL cannot be reached (worth a retry)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.TimeoutError | OSError | TimeoutError):
        return True
    original = getattr(exc, "orig", exc)
    return isinstance(original, psycopg.OperationalError) and not isinstance(
        original, psycopg.errors.QueryCanceled
    )


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction; connection failures become StoreUnavailable."""
    try:
        async with engine.begin() as connection:
            yield connection
    except (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError) as exc:
        if is_unavailable(exc):
            raise StoreUnavailable("PostgreSQL is unavailable") from exc
        raise


@asynccontextmanager
async def connect(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection outside any explicit transaction (for reads)."""
    try:
        async with engine.connect() as connection:
            yield connection
    except (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError) as exc:
        if is_unavailable(exc):
            raise StoreUnavailable("PostgreSQL is unavailable") from exc
        raise
