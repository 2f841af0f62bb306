"""Job submission and cancel over HTTP, against a real PostgreSQL (no worker)."""

import asyncio
import uuid

import pytest

from command_api.job_commands import sweep_idempotency_keys
from shared.event_store import EventStore
from shared.jobs.state import job_stream
from tests.user_api import (
    bearer,
    gateway_client,
    register,
    sign_in,
    unique_email,
)


async def new_user(client) -> dict[str, str]:
    email = unique_email()
    await register(client, email)
    return bearer(await sign_in(client, email))


async def test_submitting_a_job_answers_202_pending_with_location_and_position(
    client, store: EventStore
):
    auth = await new_user(client)

    response = await client.post(
        "/api/v1/jobs/", json={"task": "echo", "payload": {"a": 1}}, headers=auth
    )

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "PENDING"
    assert (job["task"], job["attempts"], job["progress"]) == ("echo", 0, 0.0)
    assert job["result_data"] is None
    assert response.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    events = await store.read_stream(job_stream(uuid.UUID(job["id"])))
    assert [e.type for e in events] == ["JobSubmitted"]
    assert int(response.headers["Helix-Position"]) == events[0].position
    assert job["submitted_at"] == events[0].recorded_at.isoformat().replace(
        "+00:00", "Z"
    )
    assert events[0].data["max_retries"] == 3
    assert events[0].data["timeout_s"] == 300
    assert events[0].data["payload"] == {"a": 1}


async def test_submitting_needs_a_token(client):
    response = await client.post("/api/v1/jobs/", json={"task": "echo"})

    assert response.status_code == 401


async def test_an_unknown_task_is_refused_listing_the_known_tasks(client):
    auth = await new_user(client)

    response = await client.post(
        "/api/v1/jobs/", json={"task": "mine_coins"}, headers=auth
    )

    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", "task"]
    assert detail["known_tasks"] == [
        "aggregate",
        "checksum",
        "echo",
        "fail",
        "sleep",
        "text_stats",
    ]


async def test_a_payload_the_task_refuses_is_422_naming_the_fields(client):
    auth = await new_user(client)

    response = await client.post(
        "/api/v1/jobs/",
        json={"task": "checksum", "payload": {"algorithm": "crc32"}},
        headers=auth,
    )

    assert response.status_code == 422
    locs = sorted(tuple(d["loc"]) for d in response.json()["detail"])
    assert locs == [("body", "payload", "algorithm"), ("body", "payload", "data")]


@pytest.mark.parametrize(
    "limits",
    [
        {"max_retries": 11},
        {"timeout_s": 3601},
        {"timeout_s": 0},
        {"max_retries": True},
        {"max_retries": "3"},
        {"timeout_s": "5"},
    ],
)
async def test_retries_and_timeout_beyond_their_limits_are_refused(client, limits):
    auth = await new_user(client)

    response = await client.post(
        "/api/v1/jobs/", json={"task": "echo", **limits}, headers=auth
    )

    assert response.status_code == 422


async def test_a_body_over_one_mebibyte_is_413(client):
    auth = await new_user(client)
    text = "x" * (1024 * 1024)

    response = await client.post(
        "/api/v1/jobs/",
        json={"task": "text_stats", "payload": {"text": text}},
        headers=auth,
    )

    assert response.status_code == 413


async def test_the_same_idempotency_key_returns_the_same_job(client, engine):
    auth = await new_user(client)
    headers = {**auth, "Idempotency-Key": "order-17"}
    body = {"task": "echo", "payload": {"n": 17}}

    first = await client.post("/api/v1/jobs/", json=body, headers=headers)
    again = await client.post("/api/v1/jobs/", json=body, headers=headers)

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"]
    async with engine.connect() as connection:
        count = await connection.exec_driver_sql(
            "SELECT count(*) FROM events WHERE type = 'JobSubmitted'"
        )
    assert count.scalar_one() == 1


async def test_a_default_sent_or_left_out_is_the_same_request(client):
    headers = {**await new_user(client), "Idempotency-Key": "defaults"}

    implied = await client.post("/api/v1/jobs/", json={"task": "echo"}, headers=headers)
    spelled = await client.post(
        "/api/v1/jobs/",
        json={"task": "echo", "payload": {}, "max_retries": 3, "timeout_s": 300},
        headers=headers,
    )

    assert (implied.status_code, spelled.status_code) == (202, 202)
    assert spelled.json()["id"] == implied.json()["id"]


async def test_an_idempotency_key_reused_with_another_body_is_409(client):
    auth = await new_user(client)
    headers = {**auth, "Idempotency-Key": "k1"}
    await client.post("/api/v1/jobs/", json={"task": "echo"}, headers=headers)

    response = await client.post(
        "/api/v1/jobs/", json={"task": "echo", "payload": {"x": 1}}, headers=headers
    )

    assert response.status_code == 409


async def test_idempotency_keys_are_per_user(client):
    body = {"task": "echo"}
    one = await client.post(
        "/api/v1/jobs/",
        json=body,
        headers={**await new_user(client), "Idempotency-Key": "same"},
    )
    two = await client.post(
        "/api/v1/jobs/",
        json=body,
        headers={**await new_user(client), "Idempotency-Key": "same"},
    )

    assert one.json()["id"] != two.json()["id"]


async def test_an_idempotency_key_older_than_a_day_makes_a_new_job(client, engine):
    auth = await new_user(client)
    headers = {**auth, "Idempotency-Key": "yesterday"}
    first = await client.post("/api/v1/jobs/", json={"task": "echo"}, headers=headers)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "UPDATE job_idempotency_keys SET created_at = now() - interval '25 hours'"
        )

    second = await client.post("/api/v1/jobs/", json={"task": "echo"}, headers=headers)

    assert second.status_code == 202
    assert second.json()["id"] != first.json()["id"]


async def test_the_command_api_deletes_expired_idempotency_keys(
    client, engine, app_settings
):
    auth = await new_user(client)
    for key in ("old", "fresh"):
        headers = {**auth, "Idempotency-Key": key}
        await client.post("/api/v1/jobs/", json={"task": "echo"}, headers=headers)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "UPDATE job_idempotency_keys SET created_at = now() - interval '25 hours'"
            " WHERE idempotency_key = 'old'"
        )

    # Each command API process sweeps when it starts, then every hour.
    async with gateway_client(app_settings):
        async with asyncio.timeout(30):
            while True:
                async with engine.connect() as connection:
                    keys = (
                        await connection.exec_driver_sql(
                            "SELECT idempotency_key FROM job_idempotency_keys"
                        )
                    ).scalars()
                    remaining = sorted(keys)
                if remaining == ["fresh"]:
                    break
                await asyncio.sleep(0.05)
    assert await sweep_idempotency_keys(engine) == 0


async def test_cancelling_a_pending_job_revokes_it_at_once(client, store):
    auth = await new_user(client)
    job = (
        await client.post("/api/v1/jobs/", json={"task": "echo"}, headers=auth)
    ).json()

    response = await client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)

    assert response.status_code == 202
    assert response.json()["status"] == "REVOKED"
    assert int(response.headers["Helix-Position"]) > 0
    events = await store.read_stream(job_stream(uuid.UUID(job["id"])))
    assert [e.type for e in events] == [
        "JobSubmitted",
        "JobCancelRequested",
        "JobCancelled",
    ]


async def test_cancelling_a_finished_job_is_409(client):
    auth = await new_user(client)
    job = (
        await client.post("/api/v1/jobs/", json={"task": "echo"}, headers=auth)
    ).json()
    await client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)

    response = await client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)

    assert response.status_code == 409


async def test_another_users_job_cannot_be_cancelled_and_seems_not_to_exist(client):
    owner = await new_user(client)
    job = (
        await client.post("/api/v1/jobs/", json={"task": "echo"}, headers=owner)
    ).json()

    other = await client.post(
        f"/api/v1/jobs/{job['id']}/cancel", headers=await new_user(client)
    )
    missing = await client.post(f"/api/v1/jobs/{uuid.uuid4()}/cancel", headers=owner)

    assert other.status_code == 404
    assert missing.status_code == 404


async def test_racing_requests_with_one_idempotency_key_make_one_job(client, engine):
    auth = await new_user(client)
    headers = {**auth, "Idempotency-Key": "double-click"}

    answers = await asyncio.gather(
        *(
            client.post("/api/v1/jobs/", json={"task": "echo"}, headers=headers)
            for _ in range(5)
        )
    )

    assert {answer.status_code for answer in answers} == {202}
    assert len({answer.json()["id"] for answer in answers}) == 1
    async with engine.connect() as connection:
        count = await connection.exec_driver_sql(
            "SELECT count(*) FROM events WHERE type = 'JobSubmitted'"
        )
    assert count.scalar_one() == 1
