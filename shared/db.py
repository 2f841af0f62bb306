"""Database access: one async SQLAlchemy engine a process, on psycopg 3."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import psycopg
from psycopg.rows import RowFactory, tuple_row
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from shared.errors import StoreUnavailable
from shared.settings import Settings

APPLICATION = "helixnet-core"
Component = Literal[
    "command-api", "query-api", "gateway", "projectors", "worker", "cli", "setup"
]
_component: Component | None = None


def name_sessions(component: Component) -> None:
    """Name the PostgreSQL sessions this process opens after its component.

    Called once, at process start. `pg_stat_activity`, and `/health/` when a
    session holds back the log's read horizon, then name the component behind
    a backend, as in `helixnet-core/projectors`.
    """
    global _component
    _component = component


def application_name() -> str:
    return f"{APPLICATION}/{_component}" if _component else APPLICATION


def create_engine(
    settings: Settings, *, pool_size: int | None = None, durable: bool = True
) -> AsyncEngine:
    """The pool of one process.

    `durable=False` is for processes that write only what the log can rebuild
    (read tables, checkpoints): their commits do not wait for the WAL flush. A
    server crash may then undo their last moments of work, whole transactions
    at a time and in commit order, and they redo it from their checkpoints.
    """
    return create_async_engine(
        settings.database_url,
        pool_size=pool_size or settings.database_pool_size,
        max_overflow=0,
        pool_timeout=settings.database_connect_timeout_s * 2,
        # No pre-ping: it costs a round trip on every checkout. A connection that
        # died with the server is invalidated on first use and reported as
        # StoreUnavailable, and the pool then reconnects.
        pool_recycle=1800,
        # An error's text names the statement, never its values: they include
        # password hashes and personal data.
        hide_parameters=True,
        connect_args=connect_options(settings.database_connect_timeout_s, durable),
    )


# Idle seconds before the first probe, seconds between probes, probes missed.
KEEPALIVE = (30, 10, 3)


def connect_options(timeout_s: float, durable: bool = True) -> dict[str, Any]:
    """libpq options for every connection of HelixNet Core.

    Both ends probe an idle connection, so that a peer that vanished without
    closing it (a host lost, a network cut) is noticed within about a minute:
    the client reconnects, and the server ends the session and releases what it
    held (the relay's advisory lock, a running job's lock), so others take over.
    Data sent and not acknowledged within that minute (a link that drops every
    packet while the connection is busy, where probes never start) ends the
    connection too: TCP_USER_TIMEOUT, at both ends.
    """
    idle, interval, count = KEEPALIVE
    unacknowledged_ms = (idle + interval * count) * 1000
    server = [
        f"-c tcp_keepalives_idle={idle}",
        f"-c tcp_keepalives_interval={interval}",
        f"-c tcp_keepalives_count={count}",
        f"-c tcp_user_timeout={unacknowledged_ms}",
    ]
    if not durable:
        server.append("-c synchronous_commit=off")
    return {
        "connect_timeout": max(1, int(timeout_s)),
        "application_name": application_name(),
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": count,
        "tcp_user_timeout": unacknowledged_ms,
        "options": " ".join(server),
    }


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


_DRIVER_ERRORS = (sa_exc.DBAPIError, sa_exc.TimeoutError, psycopg.Error, OSError)

# Key in Connection.info: async callables, given the psycopg connection, to run
# once the transaction has committed.
AFTER_COMMIT = "helix.after_commit"


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction; connection failures become StoreUnavailable.

    Callables that code inside the transaction puts in
    `connection.info[AFTER_COMMIT]` run after it commits, on the same connection
    (the event store uses this to wake the log's tailers).
    """
    try:
        async with engine.connect() as connection:
            # Connection.info outlives this checkout: start and end it empty.
            connection.info.pop(AFTER_COMMIT, None)
            try:
                async with connection.begin():
                    yield connection
                after_commit = connection.info.pop(AFTER_COMMIT, [])
                if after_commit:
                    driver = await driver_connection(connection)
                    for callback in after_commit:
                        await callback(driver)
            finally:
                connection.info.pop(AFTER_COMMIT, None)
    except _DRIVER_ERRORS as exc:
        if is_unavailable(exc):
            raise StoreUnavailable("PostgreSQL is unavailable") from exc
        raise


@asynccontextmanager
async def snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A read-only transaction whose statements all see the same moment: a page
    and its total, say, which two statements of their own could see apart."""
    async with transaction(engine) as connection:
        await connection.exec_driver_sql(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        )
        yield connection


@asynccontextmanager
async def connect(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection outside any explicit transaction (for reads)."""
    try:
        async with engine.connect() as connection:
            try:
                yield connection
            except psycopg.OperationalError:
                # Raised by the driver directly, so the pool has not seen it.
                await connection.invalidate()
                raise
    except _DRIVER_ERRORS as exc:
        if is_unavailable(exc):
            raise StoreUnavailable("PostgreSQL is unavailable") from exc
        raise


async def driver_connection(connection: AsyncConnection) -> psycopg.AsyncConnection:
    """The psycopg connection under `connection`, for hot paths that skip SQLAlchemy.

    Statements run on it share the SQLAlchemy connection's transaction.
    """
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    return driver


async def fetch(
    engine: AsyncEngine,
    sql: str,
    params: Any = None,
    *,
    row_factory: RowFactory[Any] | None = None,
) -> list[Any]:
    """The rows of one read-only statement, run in autocommit on a pooled connection.

    For hot reads (a token's account, a job's row). One statement is consistent on
    its own, so it needs no transaction: autocommit saves the BEGIN and ROLLBACK
    round trips, and the driver's rows skip SQLAlchemy's result processing.
    """
    async with connect(engine) as connection:
        driver = await driver_connection(connection)
        await driver.set_autocommit(True)
        try:
            cursor = driver.cursor(row_factory=row_factory or tuple_row)
            await cursor.execute(sql, params)
            return await cursor.fetchall()
        finally:
            await driver.set_autocommit(False)
