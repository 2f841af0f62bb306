"""`make setup` on a machine where the database does not exist yet."""

import subprocess
import sys
import uuid

import psycopg

from tests import databases
from tests.stack import PROJECT_ROOT, environment, settings_for


def run_setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "command_api.setup"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_setup_creates_migrates_and_seeds_a_missing_database_idempotently():
    name = f"helix_test_setup_{uuid.uuid4().hex[:8]}"
    settings = settings_for(
        databases.database_url(name), first_superuser_email="root@helix.net"
    )
    env = environment(settings)
    try:
        first = run_setup(env)
        second = run_setup(env)

        assert first.returncode == 0, first.stderr
        assert second.returncode == 0, second.stderr
        with psycopg.connect(settings.psycopg_dsn) as connection:
            [(head,)] = connection.execute("SELECT version_num FROM alembic_version")
            registered = connection.execute(
                "SELECT count(*) FROM events WHERE type = 'UserRegistered'"
            ).fetchone()
            superusers = connection.execute(
                "SELECT count(*) FROM user_credentials WHERE is_superuser"
            ).fetchone()
        assert head == max(
            path.name.split("_")[0]
            for path in (PROJECT_ROOT / "migrations" / "versions").glob("0*.py")
        )
        assert registered == (1,)
        assert superusers == (1,)
    finally:
        databases.drop(name)
