"""`helix`: operate the projections and read the event log from a terminal.

    helix projections status
    helix projections rebuild users        (or --all)
    helix projections verify --all
    helix projections retire old_name       (one removed from the code)
    helix events tail --category job --follow
    helix events stream user-<uuid> --json
    helix keys rewrap

Settings come from the `HELIX_*` environment, like every other process.
"""

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.framework import Projection, ensure_created, retire
from projectors.projections import discover
from projectors.rebuild import REBUILD_BATCH, TableDifference, rebuild, verify
from shared import pii
from shared.checkpoints import lags
from shared.db import connect, create_engine, name_sessions
from shared.errors import Conflict, HelixError, StoreUnavailable
from shared.event_store import EventStore, LogPosition, RecordedEvent
from shared.events import registry
from shared.events.registry import EventRegistry
from shared.log_listener import LogListener
from shared.settings import Settings

app = typer.Typer(help="Operate HelixNet Core's projections and read its event log.")
projections_app = typer.Typer(help="Projection status, blue-green rebuilds, checks.")
events_app = typer.Typer(help="Print events from the log.")
keys_app = typer.Typer(help="Users' personal-data keys.")
app.add_typer(projections_app, name="projections")
app.add_typer(events_app, name="events")
app.add_typer(keys_app, name="keys")

console = Console()
errors = Console(stderr=True)
T = TypeVar("T")
# How long `events tail --follow` waits for a wake-up before it looks again, and
# so how soon it notices it was told to stop.
FOLLOW_POLL_S = 0.5
POOL_SIZE = 4


def load_projections() -> list[Projection]:
    return discover()


def load_registry() -> EventRegistry:
    return registry


def _run(work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    settings = _settings()
    name_sessions("cli")

    async def main() -> T:
        engine = create_engine(settings, pool_size=POOL_SIZE)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    with _one_line_errors():
        return asyncio.run(main())


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"HELIX_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
            if e["loc"]
            else e["msg"]
            for e in exc.errors()
        )
        _fail(f"invalid settings: {problems}", 2)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """What an operator can act on is one line on stderr and exit status 1."""
    try:
        yield
    except ModuleNotFoundError as exc:
        _fail(f"HELIX_DATABASE_URL names a driver that is not installed: {exc}")
    except StoreUnavailable as exc:
        # The server answered, but has no such database: that one can be fixed.
        missing = re.search(r'database "[^"]*" does not exist', str(exc.__cause__))
        if missing:
            _fail(f"PostgreSQL: {missing.group()} (run `make setup` to create it)")
        _fail(str(exc))
    except (HelixError, OSError, UnicodeError) as exc:
        _fail(str(exc))
    except (SQLAlchemyError, psycopg.Error) as exc:
        original = getattr(exc, "orig", None) or exc
        lines = str(original).strip().splitlines()
        hint = ""
        if isinstance(original, psycopg.errors.UndefinedTable):
            hint = " (is the database set up? run `make setup`)"
        _fail(f"PostgreSQL: {lines[0] if lines else type(original).__name__}{hint}")


def _fail(message: str, status: int = 1) -> NoReturn:
    errors.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(status)


def _select(name: str | None, every: bool) -> list[Projection]:
    projections = load_projections()
    if every == (name is not None):
        errors.print("name one projection, or pass --all")
        raise typer.Exit(2)
    if every:
        return projections
    chosen = [p for p in projections if p.name == name]
    if not chosen:
        known = ", ".join(p.name for p in projections) or "none"
        errors.print(f"no projection called {name!r} (known: {known})")
        raise typer.Exit(2)
    return chosen


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} events/s" if speed else "", style="cyan")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@projections_app.command("status")
def projections_status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Each projection's generation, checkpoint and lag, and the relay's."""

    async def work(engine: AsyncEngine) -> tuple[LogPosition, list[dict[str, Any]]]:
        head = await EventStore(engine).head()
        async with connect(engine) as connection:
            result = await connection.exec_driver_sql(
                "SELECT name, live_generation, building_generation, schema_hash"
                " FROM projection_state"
            )
            state: dict[str, Any] = {row[0]: row[1:] for row in result.all()}
        hashes = {p.name: p.schema_hash for p in load_projections()}
        rows = []
        for lag in await lags(engine):
            live, building, schema_hash = state.get(lag.name, (None, None, None))
            rows.append(
                {
                    "name": lag.name,
                    "generation": live,
                    "building_generation": building,
                    "stale": lag.name in hashes and hashes[lag.name] != schema_hash,
                    "checkpoint": list(lag.checkpoint),
                    "lag_events": lag.events,
                    "lag_seconds": round(lag.seconds, 3),
                }
            )
        return head, rows

    head, rows = _run(work)
    if as_json:
        print(json.dumps({"head": list(head), "checkpoints": rows}))
        return
    table = Table(title=f"log head: position {head.position} (transaction {head[0]})")
    for column in ("name", "generation", "checkpoint", "lag (events)", "lag (s)"):
        table.add_column(column)
    for row in rows:
        generation = "" if row["generation"] is None else str(row["generation"])
        if row["building_generation"]:
            generation += f" (building {row['building_generation']})"
        if row["stale"]:
            generation += " (stale: rebuild)"
        table.add_row(
            row["name"],
            generation,
            str(row["checkpoint"][1]),
            str(row["lag_events"]),
            f"{row['lag_seconds']:.1f}",
        )
    console.print(table)


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str | None, typer.Argument(help="The projection.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every projection.")] = False,
    batch_size: Annotated[int, typer.Option(min=100)] = REBUILD_BATCH,
) -> None:
    """Build new tables from the whole log, then swap them in (blue-green).

    The old tables keep serving meanwhile. Interrupting is safe: running it again
    resumes the generation it was building.
    """
    chosen = _select(name, every)
    events = load_registry()

    async def work(engine: AsyncEngine) -> None:
        await ensure_created(engine, chosen)
        store = EventStore(engine, events)
        with _progress() as progress:
            for projection in chosen:
                task = progress.add_task(projection.name, total=None)

                def show(done: int, total: int, task: Any = task) -> None:
                    progress.update(task, completed=done, total=total)

                result = await rebuild(
                    engine,
                    projection,
                    store=store,
                    progress=show,
                    batch_size=batch_size,
                )
                progress.console.print(
                    f"{result.projection}: generation {result.generation} is live,"
                    f" {result.events} events applied"
                )

    _run(work)


@projections_app.command("retire")
def projections_retire(
    name: Annotated[str, typer.Argument(help="A projection removed from the code.")],
) -> None:
    """Stop counting a removed projection's lag (its tables are kept)."""
    if name in {p.name for p in load_projections()}:
        _fail(f"{name} is still in the code: remove it there first", 2)

    async def work(engine: AsyncEngine) -> bool:
        return await retire(engine, name)

    if not _run(work):
        _fail(f"no projection called {name!r} in the database", 2)
    console.print(f"{name}: retired; its tables are kept until you drop them")


@projections_app.command("verify")
def projections_verify(
    name: Annotated[str | None, typer.Argument(help="The projection.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every projection.")] = False,
    batch_size: Annotated[int, typer.Option(min=100)] = REBUILD_BATCH,
) -> None:
    """Rebuild into scratch tables and compare with the live ones; exit 1 if they
    differ, printing the rows that do."""
    chosen = _select(name, every)
    events = load_registry()

    async def work(engine: AsyncEngine) -> dict[str, list[TableDifference]]:
        stale = await ensure_created(engine, chosen)
        if stale:
            # Their live tables have other columns: there is nothing to compare.
            names = ", ".join(p.name for p in stale)
            raise Conflict(f"made from another definition, rebuild first: {names}")
        store = EventStore(engine, events)
        found = {}
        with _progress() as progress:
            for projection in chosen:
                task = progress.add_task(f"verify {projection.name}", total=None)

                def show(done: int, total: int, task: Any = task) -> None:
                    progress.update(task, completed=done, total=total)

                found[projection.name] = await verify(
                    engine,
                    projection,
                    store=store,
                    progress=show,
                    batch_size=batch_size,
                )
        return found

    differing = False
    for projection_name, differences in _run(work).items():
        if not differences:
            console.print(f"{projection_name}: live tables match the log")
            continue
        differing = True
        for difference in differences:
            console.print(
                f"[red]{projection_name}: table {difference.table} differs[/red]"
                f" ({difference.live_rows} live rows,"
                f" {difference.rebuilt_rows} rebuilt)"
            )
            for row in difference.only_live:
                console.print(f"  only live:    {json.dumps(row, default=str)}")
            for row in difference.only_rebuilt:
                console.print(f"  only rebuilt: {json.dumps(row, default=str)}")
    if differing:
        raise typer.Exit(1)


def _print_events(events: Sequence[RecordedEvent], as_json: bool) -> None:
    for event in events:
        if as_json:
            sys.stdout.write(json.dumps(event.envelope()) + "\n")
            continue
        actor = event.metadata.get("actor_id") or "-"
        line = Text(
            f"{event.position:>9} {event.recorded_at:%Y-%m-%d %H:%M:%S}"
            f" {event.stream_id} v{event.version} "
        )
        line.append(event.type, style="bold")
        line.append(f" actor={actor} {json.dumps(event.data, default=str)}")
        console.print(line, highlight=False, soft_wrap=True)
    sys.stdout.flush()


@events_app.command("tail")
def events_tail(
    category: Annotated[str | None, typer.Option(help="Only this category.")] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help="Only this event type.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many to show first.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """The last events of the log, in log order; --follow keeps printing new ones."""
    categories = [category] if category else None
    types = [event_type] if event_type else None

    async def work(engine: AsyncEngine) -> None:
        store = EventStore(engine, load_registry())
        after = await _start_of_last(engine, limit, category, event_type)
        events = await store.read_all(
            after, limit=limit, categories=categories, types=types
        )
        _print_events(events, as_json)
        if not follow:
            return
        after = events[-1].log_position if events else await store.head()
        # Stop on SIGINT or SIGTERM by a flag the loop checks, not by cancelling
        # it: on Python 3.11 a cancel that lands as the listener wakes the loop
        # can be swallowed by `wait_for`, and the tail would run on.
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        listener = LogListener(_settings().psycopg_dsn)
        await listener.start()
        try:
            while not stopping.is_set():
                events = await store.read_all(
                    after, limit=500, categories=categories, types=types
                )
                if events:
                    _print_events(events, as_json)
                    after = events[-1].log_position
                else:
                    await listener.wait(FOLLOW_POLL_S)
        finally:
            await listener.stop()

    with contextlib.suppress(KeyboardInterrupt):
        _run(work)


async def _start_of_last(
    engine: AsyncEngine, count: int, category: str | None, event_type: str | None
) -> LogPosition:
    """The log position just before the `count` last matching events."""
    filters = ["transaction_id < pg_snapshot_xmin(pg_current_snapshot())"]
    params: dict[str, Any] = {"count": count}
    if category:
        filters.append("category = %(category)s")
        params["category"] = category
    if event_type:
        filters.append("type = %(type)s")
        params["type"] = event_type
    sql = (
        "SELECT transaction_id::text::bigint, position FROM ("
        "SELECT transaction_id, position FROM events"
        f" WHERE {' AND '.join(filters)}"
        " ORDER BY transaction_id DESC, position DESC LIMIT %(count)s) last"
        " ORDER BY transaction_id, position LIMIT 1"
    )
    async with connect(engine) as connection:
        row: Any = (await connection.exec_driver_sql(sql, params)).first()
    if row is None:
        return LogPosition(0, 0)
    # Just below the first of them in log order: (xid, position - 1) sorts after
    # every earlier event and before this one.
    return LogPosition(row[0], row[1] - 1)


@events_app.command("stream")
def events_stream(
    stream_id: Annotated[str, typer.Argument(help="For example user-<uuid>.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """Every event of one stream, in version order."""

    async def work(engine: AsyncEngine) -> list[RecordedEvent]:
        return await EventStore(engine, load_registry()).read_stream(stream_id)

    events = _run(work)
    if not events:
        errors.print(f"no events in stream {stream_id}")
        raise typer.Exit(1)
    _print_events(events, as_json)


@keys_app.command("rewrap")
def keys_rewrap() -> None:
    """Wrap every user's key under the first of HELIX_PII_MASTER_KEYS.

    Rotating a master key: put the new one first, keep the old one after it,
    restart the APIs, run this, then remove the old one.
    """
    rewrapped = _run(pii.rewrap_all)
    console.print(f"{rewrapped} keys wrapped under the first master key")
