"""With HELIX_LOG_FORMAT=json, every process writes JSON lines, its server's too.

One stack, taken through a short session and then stopped, serves the module:
the tests read what each process wrote from its start to its stop.
"""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests import databases
from tests.e2e.test_jobs import submit, wait_for
from tests.stack import ServiceStack, settings_for
from tests.user_api import signed_in, unique_email

PROCESSES = ("api", "projectors", "worker")
# How Celery writes a line when it formats it itself: `[2024-01-31 12:00:00,000: ...`.
CELERY_OWN_FORMAT = re.compile(r"^\[\d{4}-\d\d-\d\d ")


@dataclass(frozen=True)
class Session:
    lines: dict[str, list[str]]
    failed_job_id: str

    def parsed(self, process: str) -> list[dict[str, Any]]:
        """The process's JSON lines, as objects."""
        return [json.loads(line) for line in self.lines[process] if line[:1] == "{"]


@pytest.fixture(scope="module")
def session(database_template: str) -> Iterator[Session]:
    """A job that fails and a refused sign-in, then every process stopped."""
    name = databases.clone(database_template)
    settings = settings_for(databases.database_url(name), log_format="json")
    stack = ServiceStack(settings, processes=PROCESSES)
    try:
        stack.start()
        with stack.client() as client:
            client.headers.update(signed_in(client, "logs"))
            job = submit(client, "fail", {"message": "no such file"}, max_retries=0)
            assert wait_for(client, job["id"])["status"] == "FAILURE"
            refused = client.post(
                "/api/v1/token",
                data={"username": unique_email("nobody"), "password": "guess"},
            )
            assert refused.status_code == 401
        stack.stop()
        lines = {
            process: stack.logs(process, tail=10_000).splitlines()
            for process in PROCESSES
        }
        yield Session(lines, job["id"])
    finally:
        stack.stop()
        databases.drop(name)


@pytest.mark.parametrize("process", ["api", "projectors"])
def test_every_line_a_process_writes_is_a_json_object(session, process):
    lines = [line for line in session.lines[process] if line.strip()]

    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_uvicorn_start_and_stop_lines_are_json_lines(session):
    messages = [line["message"] for line in session.parsed("api")]

    assert any(m.startswith("Started server process [") for m in messages)
    assert "Application startup complete." in messages
    assert "Waiting for application shutdown." in messages
    assert any(m.startswith("Finished server process [") for m in messages)


def test_celery_lines_are_json_lines_and_only_its_banner_is_not(session):
    lines = session.lines["worker"]
    from_celery = [
        line for line in session.parsed("worker") if line["logger"].startswith("celery")
    ]

    assert any(line["message"].endswith(" ready.") for line in from_celery)
    assert [line for line in lines if CELERY_OWN_FORMAT.match(line)] == []
    assert not any(" ready." in line for line in lines if line[:1] != "{")


def test_a_refused_sign_in_is_a_json_warning_naming_reason_and_address(session):
    refused = [
        line for line in session.parsed("api") if line["message"] == "sign-in refused"
    ]

    assert [(line["level"], line["reason"]) for line in refused] == [
        ("warning", "unknown_account")
    ]
    assert refused[0]["client_address"] == "127.0.0.1"
    assert refused[0]["request_id"]


def test_a_failed_job_is_a_json_warning_from_the_worker_saying_why(session):
    failed = [
        line
        for line in session.parsed("worker")
        if line.get("job_id") == session.failed_job_id
        and line["message"] == "job failed"
    ]

    assert [(line["level"], line["task"], line["attempt"]) for line in failed] == [
        ("warning", "fail", 1)
    ]
    assert failed[0]["error"] == "no such file"
