"""The `helix` command: projection status, rebuild, verify, and reading events."""

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from projectors import cli
from projectors.framework import catch_up, ensure_created
from shared.db import create_engine, transaction
from shared.event_store import NO_STREAM, EventMetadata, EventStore
from shared.events.job import JobSubmitted
from shared.settings import Settings
from tests import databases
from tests.sample_events import ThingRenamed, sample_events
from tests.sample_projection import append_things, make_projection

META = EventMetadata(source="tests")
runner = CliRunner()


@pytest.fixture
def helix(database_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("HELIX_DATABASE_URL", database_url)
    monkeypatch.setattr(cli, "load_projections", lambda: [make_projection()])
    monkeypatch.setattr(cli, "load_registry", lambda: sample_events)
    return runner


def given(database_url: str, sql: str | None = None, things: int = 5) -> list[str]:
    """A log of `things` things, projected; then `sql` run against the database."""

    async def setup() -> list[str]:
        engine = create_engine(Settings(database_url=database_url), pool_size=4)
        store = EventStore(engine, sample_events)
        projection = make_projection()
        await ensure_created(engine, [projection])
        streams = await append_things(store, things)
        await store.append(
            streams[0],
            [ThingRenamed(old_name="t0", new_name="[red]first[/red]")],
            expected_version=1,
            metadata=META,
        )
        while True:  # until every event is below the cluster-wide read horizon
            if len(await store.read_all()) == things + 1:
                break
            await asyncio.sleep(0.01)
        await catch_up(engine, projection, store=store)
        if sql:
            async with transaction(engine) as connection:
                await connection.exec_driver_sql(sql)
        await engine.dispose()
        return streams

    return asyncio.run(setup())


def test_status_shows_each_projection_checkpoint_and_lag(helix, database_url):
    given(database_url)

    result = helix.invoke(cli.app, ["projections", "status", "--json"])

    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    (things,) = [row for row in status["checkpoints"] if row["name"] == "things"]
    assert things["generation"] == 1
    assert things["lag_events"] == 0
    assert things["checkpoint"] == status["head"]


def test_rebuild_swaps_in_a_new_generation_that_verifies(helix, database_url):
    given(database_url)

    rebuilt = helix.invoke(cli.app, ["projections", "rebuild", "things"])
    verified = helix.invoke(cli.app, ["projections", "verify", "--all"])

    assert rebuilt.exit_code == 0, rebuilt.output
    assert "generation 2 is live, 6 events applied" in rebuilt.output
    assert verified.exit_code == 0, verified.output
    assert "things: live tables match the log" in verified.output


def test_verify_exits_non_zero_and_prints_a_tampered_row(helix, database_url):
    given(database_url, "UPDATE things_g1 SET name = 'forged' WHERE size = 3")

    result = helix.invoke(cli.app, ["projections", "verify", "things"])

    assert result.exit_code == 1
    assert "table things differs" in result.output
    assert '"name": "forged"' in result.output
    assert '"name": "t3"' in result.output


def test_verify_of_a_stale_projection_says_to_rebuild_it(
    helix, database_url, monkeypatch
):
    given(database_url)
    changed = make_projection()
    changed.tables["things"] += ", colour text"
    monkeypatch.setattr(cli, "load_projections", lambda: [changed])

    result = helix.invoke(cli.app, ["projections", "verify", "things"])

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "made from another definition, rebuild first: things"
    ]


def test_only_a_projection_removed_from_the_code_can_be_retired(helix, database_url):
    given(database_url)

    in_code = helix.invoke(cli.app, ["projections", "retire", "things"])
    unknown = helix.invoke(cli.app, ["projections", "retire", "nothing"])

    assert in_code.exit_code == 2
    assert "still in the code" in in_code.output
    assert unknown.exit_code == 2


def test_rebuild_of_an_unknown_projection_is_refused(helix, database_url):
    result = helix.invoke(cli.app, ["projections", "rebuild", "nothing"])

    assert result.exit_code == 2


UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/none"


@pytest.mark.parametrize(
    "command",
    [
        ["projections", "status"],
        ["projections", "rebuild", "--all"],
        ["events", "stream", "user-x"],
        ["events", "tail"],
        ["keys", "rewrap"],
    ],
)
def test_a_command_that_cannot_reach_postgres_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("HELIX_DATABASE_URL", UNREACHABLE)

    result = runner.invoke(cli.app, command)

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["PostgreSQL is unavailable"]


def test_a_database_that_does_not_exist_is_named_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"helix_test_missing_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("HELIX_DATABASE_URL", databases.database_url(name))

    result = runner.invoke(cli.app, ["projections", "status"])

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f'PostgreSQL: database "{name}" does not exist (run `make setup` to create it)'
    ]


def test_a_database_never_set_up_is_named_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"helix_test_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(
        "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True
    ) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        monkeypatch.setenv("HELIX_DATABASE_URL", databases.database_url(name))
        result = runner.invoke(cli.app, ["events", "tail"])
    finally:
        databases.drop(name)

    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert "make setup" in line


def test_invalid_settings_are_named_and_their_values_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HELIX_PII_MASTER_KEYS", "not a key")
    monkeypatch.setenv("HELIX_FIRST_SUPERUSER_PASSWORD", "Sup3rSecretPw")

    result = runner.invoke(cli.app, ["projections", "status"])

    assert result.exit_code == 2
    assert "HELIX_PII_MASTER_KEYS" in result.output
    assert "Sup3rSecretPw" not in result.output
    assert "not a key" not in result.output


def test_events_tail_prints_the_last_events_as_json_lines(helix, database_url):
    given(database_url)

    result = helix.invoke(
        cli.app, ["events", "tail", "--type", "ThingHappened", "--limit", "2", "--json"]
    )

    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["data"]["name"] for line in lines] == ["t3", "t4"]


def test_events_stream_prints_one_stream_in_version_order(helix, database_url):
    streams = given(database_url)

    result = helix.invoke(cli.app, ["events", "stream", streams[0]])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert "v1 ThingHappened" in lines[0]
    assert "v2 ThingRenamed" in lines[1]
    assert '"new_name": "[red]first[/red]"' in lines[1]


async def submit_job(store: EventStore, task: str) -> None:
    event = JobSubmitted(
        owner_id=uuid.uuid4(), task=task, payload={}, max_retries=0, timeout_s=1
    )
    stream = f"job-{uuid.uuid4()}"
    await store.append(stream, [event], expected_version=NO_STREAM, metadata=META)


async def follow_jobs(database_url: str, *options: str) -> asyncio.subprocess.Process:
    """The real `helix events tail --follow` on job events, printing JSON lines."""
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "helix"),
        *("events", "tail", "--category", "job", *options, "--follow", "--json"),
        env={**os.environ, "HELIX_DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
    )


async def test_events_tail_follow_prints_new_events_as_they_commit(database_url):
    """The real `helix` process: the last event first, then each new one."""
    engine = create_engine(Settings(database_url=database_url), pool_size=2)
    store = EventStore(engine)

    await submit_job(store, "before")
    async with asyncio.timeout(30):
        while True:
            if await store.read_all():
                break
            await asyncio.sleep(0.01)
    tail = await follow_jobs(database_url, "--limit", "1")
    try:
        assert tail.stdout is not None

        async def next_task() -> str:
            line = await asyncio.wait_for(tail.stdout.readline(), 30)
            return str(json.loads(line)["data"]["task"])

        seen = [await next_task()]
        for task in ("first", "second"):
            await submit_job(store, task)
        seen += [await next_task(), await next_task()]
    finally:
        tail.send_signal(signal.SIGINT)
        await asyncio.wait_for(tail.wait(), 30)
        await engine.dispose()

    assert seen == ["before", "first", "second"]
    assert tail.returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_events_tail_follow_stops_on_a_signal_while_events_keep_coming(
    database_url, signum
):
    """Told to stop while the log keeps waking it, the tail still ends, cleanly."""
    engine = create_engine(Settings(database_url=database_url), pool_size=2)
    store = EventStore(engine)
    appending = True

    async def keep_appending() -> None:
        while appending:
            await submit_job(store, "echo")
            await asyncio.sleep(0.002)

    appender = asyncio.create_task(keep_appending())
    tail = await follow_jobs(database_url)
    try:
        assert tail.stdout is not None
        for _ in range(50):
            # Following for real: new events keep being printed.
            json.loads(await asyncio.wait_for(tail.stdout.readline(), 30))
        tail.send_signal(signum)

        async def drain() -> None:
            assert tail.stdout is not None
            while await tail.stdout.readline():
                pass

        await asyncio.wait_for(asyncio.gather(drain(), tail.wait()), 10)
    finally:
        appending = False
        await appender
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
        await engine.dispose()

    assert tail.returncode == 0
