"""With HELIX_LOG_FORMAT=json, every process writes JSON lines, its server's too.

One stack, run through a short session and then stopped, serves the module: the
tests read what each process wrote from its start to its end.
"""

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests import databases
from tests.e2e.test_jobs import submit, wait_for
from tests.stack import ServiceStack, settings_for
from tests.user_api import signed_in

PROCESSES = ("api", "projectors", "worker")
# How Celery writes a line when it formats it itself: `[2024-01-31 12:00:00,000: ...`.
CELERY_OWN_FORMAT = re.compile(r"^\[\d{4}-\d\d-\d\d ")


@pytest.fixture(scope="module")
def written(database_template: str) -> Iterator[dict[str, list[str]]]:
    """The lines each process wrote, from its start to its stop."""
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
                data={"username": "nobody@example.com", "password": "guess"},
            )
            assert refused.status_code == 401
        stack.stop()
        yield {
            process: stack.logs(process, tail=10_000).splitlines()
            for process in PROCESSES
        }
    finally:
        stack.stop()
        databases.drop(name)


def parsed(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.parametrize("process", ["api", "projectors"])
def test_every_line_a_process_writes_is_a_json_object(written, process):
    lines = [line for line in written[process] if line.strip()]

    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_uvicorn_start_and_stop_lines_are_json_lines(written):
    said = {(line["logger"], line["message"]) for line in parsed(written["api"])}

    messages = {message for _, message in said}
    assert any(m.startswith("Started server process [") for m in messages), said
    assert "Application startup complete." in messages
    assert "Waiting for application shutdown." in messages
    assert any(m.startswith("Finished server process [") for m in messages), said


def test_celery_lines_are_json_lines_and_only_its_banner_is_not(written):
    lines = written["worker"]
    celery_lines = [
        line for line in parsed(lines) if str(line["logger"]).startswith("celery")
    ]

    assert any(line["message"].endswith(" ready.") for line in celery_lines)
    assert [line for line in lines if CELERY_OWN_FORMAT.match(line)] == []
    assert not any(" ready." in line for line in lines if not line.startswith("{"))


def test_a_refused_sign_in_is_a_json_warning_naming_reason_and_address(written):
    refused = [
        line for line in parsed(written["api"]) if line["message"] == "sign-in refused"
    ]

    assert [(line["level"], line["reason"]) for line in refused] == [
        ("warning", "unknown_account")
    ]
    assert refused[0]["client_address"] == "127.0.0.1"
    assert refused[0]["request_id"]
