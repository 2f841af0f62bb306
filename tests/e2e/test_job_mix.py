"""Many jobs of every kind at once, with cancels, while the worker is killed and the
projectors restart: every job still ends, once, and the read model agrees with the
log.
"""

import asyncio
import random
import signal
import time
from collections import defaultdict
from typing import Any

import httpx
import psycopg

from tests.stack import ServiceStack, settings_for
from tests.user_api import bearer, register, sign_in

JOBS = 150
CONCURRENCY = 8
TERMINAL_EVENTS = {"JobSucceeded": "SUCCESS", "JobFailed": "FAILURE"}
TERMINAL_EVENTS["JobCancelled"] = "REVOKED"


def a_job(rng: random.Random, i: int) -> dict[str, Any]:
    """A submission drawn from the built-in tasks, the short and the doomed."""
    kind = rng.choice(["echo", "sleep", "fail", "timeout", "checksum", "aggregate"])
    if kind == "echo":
        return {"task": "echo", "payload": {"i": i}}
    if kind == "sleep":
        seconds = rng.choice([0.01, 0.2, 1.0])
        return {"task": "sleep", "payload": {"seconds": seconds}}
    if kind == "fail":
        payload = {"message": f"no {i}", "retryable": rng.random() < 0.5}
        return {"task": "fail", "payload": payload, "max_retries": rng.randint(0, 2)}
    if kind == "timeout":
        return {
            "task": "sleep",
            "payload": {"seconds": 5},
            "timeout_s": 0.3,
            "max_retries": 0,
        }
    if kind == "checksum":
        return {"task": "checksum", "payload": {"data": f"data {i}"}}
    return {"task": "aggregate", "payload": {"values": list(range(1, i + 2))}}


async def submit_all(
    client: httpx.AsyncClient, rng: random.Random
) -> dict[str, dict[str, Any]]:
    """Submit JOBS jobs, cancelling some a moment later; the bodies by job id."""
    bodies: dict[str, dict[str, Any]] = {}
    slots = asyncio.Semaphore(CONCURRENCY)
    plan = [(a_job(rng, i), rng.random() < 0.2, rng.random() / 2) for i in range(JOBS)]

    async def one(body: dict[str, Any], cancel: bool, after_s: float) -> None:
        async with slots:
            response = await client.post("/api/v1/jobs/", json=body)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            bodies[job_id] = body
        if cancel:
            await asyncio.sleep(after_s)
            answer = await client.post(f"/api/v1/jobs/{job_id}/cancel")
            # 409 when it had finished already.
            assert answer.status_code in (202, 409), answer.text

    await asyncio.gather(*(one(*step) for step in plan))
    return bodies


async def disturb(stack: ServiceStack) -> None:
    """Kill the worker mid-run and restart the projectors, twice over."""
    await asyncio.sleep(1.0)
    stack.signal("worker", signal.SIGKILL)
    stack.start("worker")
    await asyncio.sleep(1.0)
    stack.stop("projectors")
    stack.start("projectors")
    await asyncio.sleep(0.5)
    stack.signal("projectors", signal.SIGKILL)
    stack.start("projectors")


async def finished_jobs(
    client: httpx.AsyncClient, job_ids: list[str], timeout_s: float = 120
) -> dict[str, dict[str, Any]]:
    """Each job as the query API shows it, once it shows every job finished."""
    deadline = time.monotonic() + timeout_s
    jobs: dict[str, dict[str, Any]] = {}
    while True:
        for job_id in job_ids:
            if jobs.get(job_id, {}).get("status") in TERMINAL_EVENTS.values():
                continue
            response = await client.get(f"/api/v1/jobs/{job_id}")
            if response.status_code == 200:
                jobs[job_id] = response.json()
        unfinished = [
            job_id
            for job_id in job_ids
            if jobs.get(job_id, {}).get("status") not in TERMINAL_EVENTS.values()
        ]
        if not unfinished:
            return jobs
        assert time.monotonic() < deadline, f"never finished: {unfinished[:5]}"
        await asyncio.sleep(0.5)


async def run_the_mix(stack: ServiceStack) -> tuple[dict, dict]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        user = await register(client)
        client.headers.update(bearer(await sign_in(client, user["email"])))
        bodies, _ = await asyncio.gather(
            submit_all(client, random.Random(20261204)), disturb(stack)
        )
        return bodies, await finished_jobs(client, list(bodies))


def test_a_mix_of_jobs_through_crashes_ends_each_job_once(database_url):
    stack = ServiceStack(
        settings_for(database_url, job_retry_base_s=0.2, job_retry_cap_s=1.0),
        processes=("api", "projectors", "worker"),
    )
    try:
        stack.start()
        bodies, jobs = asyncio.run(run_the_mix(stack))
    finally:
        stack.stop()

    with psycopg.connect(stack.settings.psycopg_dsn) as connection:
        rows = connection.execute(
            "SELECT stream_id, type FROM events WHERE category = 'job'"
            " ORDER BY stream_id, version"
        ).fetchall()
    types: dict[str, list[str]] = defaultdict(list)
    for stream_id, event_type in rows:
        types[stream_id.removeprefix("job-")].append(event_type)

    assert len(jobs) == JOBS
    for job_id, job in jobs.items():
        history = types[job_id]
        terminal = [t for t in history if t in TERMINAL_EVENTS]
        assert len(terminal) == 1, (job_id, history)
        assert job["status"] == TERMINAL_EVENTS[terminal[0]], (job, history)
        assert job["attempts"] == history.count("JobStarted"), (job, history)
        body = bodies[job_id]
        if body["task"] == "echo" and job["status"] == "SUCCESS":
            assert job["result_data"] == body["payload"]
        if body["task"] == "fail":
            assert job["status"] in ("FAILURE", "REVOKED")
        if body.get("timeout_s") == 0.3 and job["status"] == "FAILURE":
            # Unless the killed worker was running it, on its only attempt.
            assert job["message"] in (
                "timed out after 0.3 s",
                "the worker running the job was lost",
            )
