"""Job reads over HTTP: the jobs projection, applied in the test, no worker process."""

import asyncio
import time
import uuid

import pytest

from projectors.framework import ensure_created
from projectors.projections.jobs import projection
from shared.event_store import EventStore
from shared.jobs import load_catalog
from shared.jobs.state import job_stream
from tests.horizon import project_everything
from tests.user_api import (
    bearer,
    gateway_client,
    register,
    sign_in,
    superuser_token,
    unique_email,
)
from workers.runner import JobRunner


@pytest.fixture
async def client(app_settings, engine):
    await ensure_created(engine, [projection])
    async with gateway_client(app_settings) as client:
        yield client


@pytest.fixture
def runner(engine, store, settings) -> JobRunner:
    return JobRunner(
        engine=engine, store=store, catalog=load_catalog(), settings=settings
    )


async def new_user(client) -> tuple[dict[str, str], str]:
    email = unique_email()
    user = await register(client, email)
    return bearer(await sign_in(client, email)), user["id"]


async def project(engine, store: EventStore) -> None:
    """Apply the jobs projection up to the last event appended so far."""
    await project_everything(engine, projection)


async def submit(client, auth, task="echo", payload=None) -> dict:
    response = await client.post(
        "/api/v1/jobs/", json={"task": task, "payload": payload or {}}, headers=auth
    )
    assert response.status_code == 202, response.text
    return {**response.json(), "position": response.headers["Helix-Position"]}


async def test_an_owner_reads_a_finished_job_with_result_and_times(
    client, engine, store, runner
):
    auth, _ = await new_user(client)
    job = await submit(client, auth, "checksum", {"data": "abc", "algorithm": "md5"})
    await runner.run(uuid.UUID(job["id"]))
    await project(engine, store)

    response = await client.get(f"/api/v1/jobs/{job['id']}", headers=auth)

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "SUCCESS"
    assert body["result_data"] == {
        "algorithm": "md5",
        "hexdigest": "900150983cd24fb0d6963f7d28e17f72",
    }
    assert (body["attempts"], body["progress"], body["message"]) == (1, 1.0, None)
    assert body["submitted_at"] == job["submitted_at"]
    assert body["started_at"] is not None
    assert body["finished_at"] is not None


async def test_helix_position_makes_a_new_job_readable_at_once(client, engine, store):
    auth, _ = await new_user(client)
    job = await submit(client, auth)

    reading = asyncio.create_task(
        client.get(
            f"/api/v1/jobs/{job['id']}",
            headers={**auth, "Helix-Position": job["position"]},
        )
    )
    await asyncio.sleep(0.2)
    await project(engine, store)
    response = await reading

    assert response.status_code == 200
    assert response.json()["status"] == "PENDING"


async def test_another_users_job_is_404_and_a_superuser_sees_it(
    client, engine, store, app_settings
):
    owner, _ = await new_user(client)
    other, _ = await new_user(client)
    job = await submit(client, owner)
    await project(engine, store)
    admin = bearer(await superuser_token(client, app_settings))

    as_other = await client.get(f"/api/v1/jobs/{job['id']}", headers=other)
    as_admin = await client.get(f"/api/v1/jobs/{job['id']}", headers=admin)
    missing = await client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=owner)

    assert as_other.status_code == 404
    assert as_admin.status_code == 200
    assert missing.status_code == 404


async def test_waiting_on_another_users_job_tells_nothing_of_it(client, engine, store):
    owner, _ = await new_user(client)
    other, _ = await new_user(client)
    job = await submit(client, owner)
    await project(engine, store)

    async def waited(job_id: object) -> tuple[int, float]:
        started = time.monotonic()
        response = await client.get(
            f"/api/v1/jobs/{job_id}", params={"wait": 1}, headers=other
        )
        return response.status_code, time.monotonic() - started

    # Both 404 only once the wait is over: a quick 404 would tell that the
    # job exists and belongs to someone else.
    for job_id in (job["id"], uuid.uuid4()):
        status, took_s = await waited(job_id)
        assert status == 404
        assert took_s >= 0.95


async def test_wait_answers_as_soon_as_the_job_finishes(client, engine, store, runner):
    auth, _ = await new_user(client)
    job = await submit(client, auth, "sleep", {"seconds": 0.3})
    await project(engine, store)

    async def run_and_project() -> None:
        await asyncio.sleep(0.2)
        await runner.run(uuid.UUID(job["id"]))
        for _ in range(100):
            await project(engine, store)
            await asyncio.sleep(0.05)

    background = asyncio.create_task(run_and_project())
    response = await client.get(
        f"/api/v1/jobs/{job['id']}", params={"wait": 30}, headers=auth
    )
    background.cancel()

    assert response.json()["status"] == "SUCCESS"
    assert response.json()["result_data"] == {"slept": 0.3}


async def test_wait_on_an_unfinished_job_answers_its_status_after_the_wait(
    client, engine, store
):
    auth, _ = await new_user(client)
    job = await submit(client, auth)
    await project(engine, store)

    response = await client.get(
        f"/api/v1/jobs/{job['id']}", params={"wait": 0.3}, headers=auth
    )

    assert response.status_code == 200
    assert response.json()["status"] == "PENDING"


async def test_wait_longer_than_thirty_seconds_is_refused(client):
    auth, _ = await new_user(client)

    response = await client.get(
        f"/api/v1/jobs/{uuid.uuid4()}", params={"wait": 31}, headers=auth
    )

    assert response.status_code == 422


async def test_the_list_shows_own_jobs_newest_first_with_paging(client, engine, store):
    auth, _ = await new_user(client)
    other, _ = await new_user(client)
    mine = [await submit(client, auth, payload={"n": n}) for n in range(5)]
    await submit(client, other)
    await project(engine, store)

    page = await client.get("/api/v1/jobs/", params={"limit": 2}, headers=auth)
    rest = await client.get(
        "/api/v1/jobs/", params={"offset": 2, "limit": 10}, headers=auth
    )

    newest_first = [job["id"] for job in reversed(mine)]
    assert page.json()["total"] == 5
    assert [job["id"] for job in page.json()["items"]] == newest_first[:2]
    assert [job["id"] for job in rest.json()["items"]] == newest_first[2:]


async def test_the_list_filters_by_status(client, engine, store, runner):
    auth, _ = await new_user(client)
    done = await submit(client, auth)
    await submit(client, auth)
    await runner.run(uuid.UUID(done["id"]))
    await project(engine, store)

    response = await client.get(
        "/api/v1/jobs/", params={"status": "SUCCESS"}, headers=auth
    )

    assert [job["id"] for job in response.json()["items"]] == [done["id"]]
    assert response.json()["total"] == 1


async def test_only_a_superuser_lists_by_owner(client, engine, store, app_settings):
    auth, owner_id = await new_user(client)
    other, _ = await new_user(client)
    job = await submit(client, auth)
    await submit(client, other)
    await project(engine, store)
    admin = bearer(await superuser_token(client, app_settings))

    as_admin = await client.get(
        "/api/v1/jobs/", params={"owner_id": owner_id}, headers=admin
    )
    everyone = await client.get("/api/v1/jobs/", headers=admin)
    as_other = await client.get(
        "/api/v1/jobs/", params={"owner_id": owner_id}, headers=other
    )

    assert [j["id"] for j in as_admin.json()["items"]] == [job["id"]]
    assert everyone.json()["total"] == 2
    assert as_other.status_code == 403


async def test_jobs_need_a_token_to_read(client):
    response = await client.get("/api/v1/jobs/")

    assert response.status_code == 401


async def test_a_stream_id_is_the_job_id(store, client):
    auth, _ = await new_user(client)
    job = await submit(client, auth)

    events = await store.read_stream(job_stream(uuid.UUID(job["id"])))

    assert events[0].stream_id == f"job-{job['id']}"


async def test_a_page_and_its_total_are_read_at_one_moment(client, engine):
    auth, user_id = await new_user(client)
    inserting = True

    async def insert_jobs() -> None:
        # Rows straight into the read table, as fast as it takes them.
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            while inserting:
                await connection.exec_driver_sql(
                    "INSERT INTO job_statuses (id, owner_id, task, status,"
                    " max_retries, timeout_s, submitted_at, version, updated_at)"
                    " VALUES (gen_random_uuid(), %s, 'echo', 'PENDING', 3, 300,"
                    " now(), 1, now())",
                    (user_id,),
                )
                await asyncio.sleep(0)

    writer = asyncio.create_task(insert_jobs())
    try:
        mismatched = 0
        for _ in range(100):
            response = await client.get(
                "/api/v1/jobs/", params={"limit": 500}, headers=auth
            )
            page = response.json()
            if page["total"] <= 500 and len(page["items"]) != page["total"]:
                mismatched += 1
        assert page["total"] > 0
    finally:
        inserting = False
        await writer
    assert mismatched == 0
