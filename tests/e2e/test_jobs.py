"""Jobs end to end: the gateway, `python -m projectors` and a Celery worker, for real.

One stack serves the module. Tests that stop the worker or RabbitMQ put them back
before they end.
"""

import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from shared.db import create_engine
from shared.event_store import EventStore, RecordedEvent
from shared.jobs.messaging import RUN_JOB_TASK, celery_app
from shared.jobs.state import job_stream
from shared.settings import Settings
from tests import databases
from tests.stack import ServiceStack, settings_for

PASSWORD = "correct horse battery"
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


@pytest.fixture(scope="module")
def stack(database_template: str) -> Iterator[ServiceStack]:
    name = databases.clone(database_template)
    settings = settings_for(databases.database_url(name), job_retry_base_s=0.5)
    stack = ServiceStack(settings, processes=("api", "projectors", "worker"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        databases.drop(name)


@pytest.fixture(scope="module")
def client(stack: ServiceStack) -> Iterator[httpx.Client]:
    with stack.client() as client:
        email = f"jobs-{uuid.uuid4().hex[:12]}@example.com"
        registered = client.post(
            "/api/v1/users/", json={"email": email, "password": PASSWORD}
        )
        assert registered.status_code == 201, registered.text
        token = client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        ).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def submit(client: httpx.Client, task: str, payload: dict, **options: Any) -> dict:
    response = client.post(
        "/api/v1/jobs/", json={"task": task, "payload": payload, **options}
    )
    assert response.status_code == 202, response.text
    job: dict = response.json()
    return job


def wait_for(client: httpx.Client, job_id: str, wait_s: float = 30) -> dict:
    """The job once it finished, through `?wait` (the server does the waiting)."""
    deadline = time.monotonic() + 90
    while True:
        response = client.get(f"/api/v1/jobs/{job_id}", params={"wait": wait_s})
        job: dict = response.json() if response.status_code == 200 else {}
        if job.get("status") in TERMINAL or time.monotonic() > deadline:
            assert job.get("status") in TERMINAL, response.text
            return job


def wait_until_started(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = client.get(f"/api/v1/jobs/{job_id}")
        if response.status_code == 200 and response.json()["status"] == "STARTED":
            job: dict = response.json()
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never started")


def events_of(settings: Settings, job_id: str) -> list[RecordedEvent]:
    async def read() -> list[RecordedEvent]:
        engine = create_engine(settings, pool_size=1)
        try:
            return await EventStore(engine).read_stream(job_stream(uuid.UUID(job_id)))
        finally:
            await engine.dispose()

    return asyncio.run(read())


def types_of(settings: Settings, job_id: str) -> list[str]:
    return [event.type for event in events_of(settings, job_id)]


def drain(client: httpx.Client) -> None:
    """Wait until the worker went through what was queued before now."""
    # Two at a time, so the worker's two processes each take one in turn.
    jobs = [submit(client, "echo", {"drain": i}) for i in range(2)]
    for job in jobs:
        assert wait_for(client, job["id"])["status"] == "SUCCESS"


BUILT_IN_RESULTS = [
    ("echo", {"nested": {"list": [1, 2.5, None, "ü"]}, "flag": True}, None),
    ("sleep", {"seconds": 0.2}, {"slept": 0.2}),
    (
        "checksum",
        {"data": "abc", "algorithm": "sha1"},
        {"algorithm": "sha1", "hexdigest": "a9993e364706816aba3e25717850c26c9cd0d89d"},
    ),
    (
        "checksum",
        {"data": "naïve"},
        {
            "algorithm": "sha256",
            "hexdigest": (
                "f86fd89de87a848a45bfe77708d91a5d2ff48b8e4a4b98af5165af82692f8928"
            ),
        },
    ),
    (
        "text_stats",
        {"text": "To be, or not to be:\nthat is the question.", "top": 3},
        {
            "lines": 2,
            "words": 10,
            "characters": 42,
            "top_words": [["be", 2], ["to", 2], ["is", 1]],
        },
    ),
    (
        "aggregate",
        {"values": [3, 1, 2, 10, 4, 5, 6, 7, 8, 9], "percentiles": [25, 50.0, 95]},
        {
            "count": 10,
            "sum": 55.0,
            "min": 1.0,
            "max": 10.0,
            "mean": 5.5,
            "stdev": 3.0276503540974917,
            "percentiles": {"25": 3.25, "50.0": 5.5, "95": 9.549999999999999},
        },
    ),
]


@pytest.mark.parametrize(("task", "payload", "expected"), BUILT_IN_RESULTS)
def test_a_built_in_task_succeeds_with_its_exact_result(
    client, task, payload, expected
):
    job = submit(client, task, payload)

    finished = wait_for(client, job["id"])

    assert finished["status"] == "SUCCESS", finished
    assert finished["result_data"] == (payload if expected is None else expected)
    assert (finished["progress"], finished["attempts"]) == (1.0, 1)
    assert finished["submitted_at"] <= finished["started_at"]
    assert finished["started_at"] <= finished["finished_at"]


def test_fail_ends_failure_with_its_message(client, stack):
    job = submit(client, "fail", {"message": "the disk is on fire"})

    finished = wait_for(client, job["id"])

    assert (finished["status"], finished["message"]) == (
        "FAILURE",
        "the disk is on fire",
    )
    assert finished["result_data"] is None
    assert types_of(stack.settings, job["id"]) == [
        "JobSubmitted",
        "JobStarted",
        "JobFailed",
    ]


def test_a_retryable_failure_is_retried_with_backoff_then_fails(client, stack):
    job = submit(client, "fail", {"message": "flaky", "retryable": True}, max_retries=2)

    finished = wait_for(client, job["id"])

    assert (finished["status"], finished["message"]) == ("FAILURE", "flaky")
    assert finished["attempts"] == 3
    events = events_of(stack.settings, job["id"])
    assert [e.type for e in events] == [
        "JobSubmitted",
        "JobStarted",
        "JobRetryScheduled",
        "JobStarted",
        "JobRetryScheduled",
        "JobStarted",
        "JobFailed",
    ]
    retries = [e for e in events if e.type == "JobRetryScheduled"]
    # Base 0.5 s: the first retry waits 0.25-0.5 s, the second 0.5-1 s.
    assert 0.25 <= retries[0].data["delay_s"] <= 0.5
    assert 0.5 <= retries[1].data["delay_s"] <= 1.0
    starts = [e for e in events if e.type == "JobStarted"][1:]
    for retry, started in zip(retries, starts, strict=True):
        retry_at = datetime.fromisoformat(retry.data["retry_at"])
        assert started.recorded_at.timestamp() >= retry_at.timestamp() - 0.1


def test_a_job_over_its_timeout_fails_saying_it_timed_out(client):
    job = submit(client, "sleep", {"seconds": 120}, timeout_s=1)

    finished = wait_for(client, job["id"])

    assert (finished["status"], finished["message"]) == (
        "FAILURE",
        "timed out after 1 s",
    )


def test_a_running_sleep_stops_when_cancelled_and_ends_revoked(client, stack):
    job = submit(client, "sleep", {"seconds": 120})
    wait_until_started(client, job["id"])

    cancelled = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    finished = wait_for(client, job["id"])

    assert cancelled.status_code == 202
    assert (finished["status"], finished["message"]) == ("REVOKED", "cancelled")
    assert types_of(stack.settings, job["id"])[-2:] == [
        "JobCancelRequested",
        "JobCancelled",
    ]
    again = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409


def test_a_pending_job_cancelled_ends_revoked_without_running(client, stack):
    stack.stop("worker")
    try:
        job = submit(client, "echo", {"never": "run"})
        cancelled = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    finally:
        stack.start("worker")
    drain(client)

    finished = wait_for(client, job["id"])

    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "REVOKED"
    assert finished["status"] == "REVOKED"
    assert types_of(stack.settings, job["id"]) == [
        "JobSubmitted",
        "JobCancelRequested",
        "JobCancelled",
    ]


def test_a_worker_killed_mid_job_still_ends_with_exactly_one_terminal_event(
    client, stack
):
    job = submit(client, "sleep", {"seconds": 2})
    wait_until_started(client, job["id"])

    stack.signal("worker")
    stack.start("worker")
    finished = wait_for(client, job["id"])

    assert finished["status"] == "SUCCESS"
    assert finished["result_data"] == {"slept": 2}
    types = types_of(stack.settings, job["id"])
    terminal = [t for t in types if t in {"JobSucceeded", "JobFailed", "JobCancelled"}]
    assert terminal == ["JobSucceeded"]
    assert types.count("JobStarted") == 2
    assert finished["attempts"] == 2


def test_the_same_task_delivered_twice_runs_once(client, stack):
    job = submit(client, "sleep", {"seconds": 1})
    celery = celery_app(stack.settings)
    for _ in range(2):
        celery.send_task(
            RUN_JOB_TASK, args=[job["id"]], queue=stack.settings.jobs_queue
        )

    finished = wait_for(client, job["id"])
    drain(client)

    assert finished["status"] == "SUCCESS"
    types = types_of(stack.settings, job["id"])
    assert types.count("JobStarted") == 1
    assert types.count("JobSucceeded") == 1


def test_a_job_submitted_while_rabbitmq_is_down_runs_once_it_is_back(client, stack):
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=60)
    try:
        job = submit(client, "echo", {"while": "down"})
    finally:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)

    finished = wait_for(client, job["id"])

    assert finished["status"] == "SUCCESS"
    assert finished["result_data"] == {"while": "down"}
    assert types_of(stack.settings, job["id"]).count("JobStarted") == 1
