"""Each process names its PostgreSQL sessions after its component, so an operator
reading `pg_stat_activity` (or `/health/` naming the backend that holds the log's
read horizon) can tell which one a backend serves."""

import psycopg

from tests import databases
from tests.e2e.test_jobs import submit, wait_for
from tests.stack import ServiceStack, settings_for
from tests.user_api import signed_in


def session_names(database: str) -> set[str]:
    server = databases.database_url("postgres").replace("+psycopg", "")
    with psycopg.connect(server) as connection:
        rows = connection.execute(
            "SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = %s",
            (database,),
        ).fetchall()
    return {row[0] for row in rows}


def test_every_process_names_its_sessions_after_its_component(database_template):
    name = databases.clone(database_template)
    settings = settings_for(databases.database_url(name))
    stack = ServiceStack(settings, processes=("api", "projectors", "worker"))
    try:
        stack.start()
        with stack.client() as client:
            client.headers.update(signed_in(client, "sessions"))
            job = submit(client, "echo", {"named": True})
            assert wait_for(client, job["id"])["status"] == "SUCCESS"

            names = session_names(name)
    finally:
        stack.stop()
        databases.drop(name)

    assert names == {
        "helixnet-core/gateway",
        "helixnet-core/projectors",
        "helixnet-core/worker",
    }
