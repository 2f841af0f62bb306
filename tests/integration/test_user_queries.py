"""User reads, history and audit over HTTP, the users projection applied in process."""

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from projectors.projections.users import projection as users_projection
from projectors.rebuild import rebuild, verify
from shared.event_store import NO_STREAM, EventMetadata, EventStore
from shared.events.job import JobSubmitted
from shared.pii import ERASED
from shared.settings import Settings
from tests.horizon import project_everything
from tests.user_api import (
    PASSWORD,
    bearer,
    register,
    sign_in,
    superuser_token,
    unique_email,
)

pytestmark = pytest.mark.usefixtures("users_table")


async def project(engine: AsyncEngine) -> None:
    """Apply every event appended so far to the users projection."""
    await project_everything(engine, users_projection)


class People:
    """User A, user B and a superuser, each signed in."""

    def __init__(self, a: dict[str, Any], tokens: dict[str, str | None]) -> None:
        self.a = a
        self.tokens = tokens

    def headers(self, who: str) -> dict[str, str]:
        token = self.tokens[who]
        return bearer(token) if token else {}


@pytest.fixture
async def people(
    client: httpx.AsyncClient, app_settings: Settings, engine: AsyncEngine
) -> People:
    a_email, b_email = unique_email("a"), unique_email("b")
    a = await register(client, a_email, full_name="Ann")
    await register(client, b_email)
    tokens = {
        "anonymous": None,
        "user A": await sign_in(client, a_email),
        "user B": await sign_in(client, b_email),
        "superuser": await superuser_token(client, app_settings),
    }
    await project(engine)
    return People(a, tokens)


async def test_every_user_read_answers_each_caller_as_the_contract_says(
    client: httpx.AsyncClient, people: People
) -> None:
    a = people.a["id"]
    expected = {
        "/api/v1/users/": [401, 403, 403, 200],
        "/api/v1/users/me": [401, 200, 200, 200],
        f"/api/v1/users/{a}": [401, 200, 404, 200],
        f"/api/v1/users/{a}/history": [401, 200, 404, 200],
        "/api/v1/audit": [401, 403, 403, 200],
    }
    callers = ["anonymous", "user A", "user B", "superuser"]

    observed = {
        path: [
            (await client.get(path, headers=people.headers(who))).status_code
            for who in callers
        ]
        for path in expected
    }

    assert observed == expected


async def test_every_user_command_answers_each_caller_as_the_contract_says(
    client: httpx.AsyncClient, people: People
) -> None:
    async def attempt(who: str) -> list[int]:
        target = await register(client)
        own = await sign_in(client, target["email"])
        headers = bearer(own) if who == "user A" else people.headers(who)
        url = f"/api/v1/users/{target['id']}"
        patch = await client.patch(url, json={"full_name": "New"}, headers=headers)
        delete = await client.delete(url, headers=headers)
        return [patch.status_code, delete.status_code]

    # "user A" acts on its own account here; user B on someone else's.
    observed = {
        who: await attempt(who)
        for who in ("anonymous", "user A", "user B", "superuser")
    }

    assert observed == {
        "anonymous": [401, 401],
        "user A": [200, 204],
        "user B": [404, 404],
        "superuser": [200, 204],
    }


async def test_me_shows_the_signed_in_user_with_its_etag(
    client: httpx.AsyncClient, people: People
) -> None:
    response = await client.get("/api/v1/users/me", headers=people.headers("user A"))

    assert response.status_code == 200
    assert response.json() == people.a
    assert response.headers["ETag"] == '"1"'


async def test_get_etag_follows_patches_and_if_none_match_gives_304(
    client: httpx.AsyncClient, people: People, engine: AsyncEngine
) -> None:
    url = f"/api/v1/users/{people.a['id']}"
    patched = await client.patch(
        url, json={"full_name": "Annie"}, headers=people.headers("user A")
    )
    await project(engine)

    read = await client.get(url, headers=people.headers("user A"))
    unchanged = await client.get(
        url, headers={**people.headers("user A"), "If-None-Match": read.headers["ETag"]}
    )

    assert read.headers["ETag"] == patched.headers["ETag"]
    assert read.json() == patched.json()
    assert unchanged.status_code == 304


async def test_superuser_lists_active_users_in_pages(
    client: httpx.AsyncClient, people: People, engine: AsyncEngine
) -> None:
    admin = people.headers("superuser")
    await client.delete(f"/api/v1/users/{people.a['id']}", headers=admin)
    await project(engine)

    everyone = await client.get("/api/v1/users/", headers=admin)
    page = await client.get("/api/v1/users/?offset=1&limit=1", headers=admin)
    too_big = await client.get("/api/v1/users/?limit=501", headers=admin)

    body = everyone.json()
    assert body["total"] == 2 == len(body["items"])
    assert people.a["id"] not in {user["id"] for user in body["items"]}
    assert page.json() == {"items": body["items"][1:2], "total": 2}
    assert too_big.status_code == 422


async def test_history_lists_a_users_events_with_personal_data_in_clear(
    client: httpx.AsyncClient, people: People
) -> None:
    url = f"/api/v1/users/{people.a['id']}/history"

    response = await client.get(url, headers=people.headers("user A"))
    first_page = await client.get(f"{url}?limit=1", headers=people.headers("user A"))
    rest = await client.get(
        f"{url}?after={first_page.json()['next_after']}",
        headers=people.headers("user A"),
    )

    items = response.json()["items"]
    assert [item["type"] for item in items] == ["UserRegistered", "UserSignedIn"]
    assert items[0]["data"]["email"] == people.a["email"]
    assert items[0]["data"]["full_name"] == "Ann"
    assert set(items[0]) == {
        "position",
        "stream_id",
        "version",
        "type",
        "recorded_at",
        "actor_id",
        "correlation_id",
        "data",
    }
    assert items[1]["actor_id"] == people.a["id"]
    assert response.json()["next_after"] is None
    assert rest.json()["items"] == items[1:]


async def test_audit_filters_by_type_actor_and_correlation_id(
    client: httpx.AsyncClient, people: People
) -> None:
    admin = people.headers("superuser")
    a = people.a["id"]
    patched = await client.patch(
        f"/api/v1/users/{a}",
        json={"full_name": "Audited"},
        headers={**people.headers("user A"), "X-Request-Id": "req-audit-1"},
    )
    assert patched.status_code == 200

    by_type = await client.get("/api/v1/audit?type=UserSignedIn", headers=admin)
    by_actor = await client.get(f"/api/v1/audit?actor_id={a}", headers=admin)
    by_request = await client.get(
        "/api/v1/audit?correlation_id=req-audit-1", headers=admin
    )
    by_stream = await client.get(
        f"/api/v1/audit?stream=user-{a}&category=user", headers=admin
    )

    assert {i["type"] for i in by_type.json()["items"]} == {"UserSignedIn"}
    assert len(by_type.json()["items"]) == 3
    assert {i["stream_id"] for i in by_actor.json()["items"]} == {f"user-{a}"}
    (change,) = by_request.json()["items"]
    assert change["type"] == "UserProfileUpdated"
    assert change["data"] == {"full_name": "Audited"}
    assert len(by_stream.json()["items"]) == 3


async def test_job_history_is_for_the_jobs_owner_and_superusers(
    client: httpx.AsyncClient, people: People, engine: AsyncEngine
) -> None:
    job_id = uuid.uuid4()
    await EventStore(engine).append(
        f"job-{job_id}",
        [
            JobSubmitted(
                owner_id=people.a["id"],
                task="echo",
                payload={},
                max_retries=0,
                timeout_s=10,
            )
        ],
        expected_version=NO_STREAM,
        metadata=EventMetadata(source="test", actor_id=people.a["id"]),
    )
    url = f"/api/v1/jobs/{job_id}/history"

    statuses = [
        (await client.get(url, headers=people.headers(who))).status_code
        for who in ("anonymous", "user A", "user B", "superuser")
    ]
    unknown = await client.get(
        f"/api/v1/jobs/{uuid.uuid4()}/history", headers=people.headers("superuser")
    )

    assert statuses == [401, 200, 404, 200]
    assert unknown.status_code == 404


async def test_erasure_leaves_no_trace_of_the_email_but_keeps_the_trail(
    client: httpx.AsyncClient, people: People, engine: AsyncEngine
) -> None:
    a, email = people.a["id"], people.a["email"]
    admin = people.headers("superuser")
    await client.patch(
        f"/api/v1/users/{a}",
        json={"full_name": "Ann Erased", "email": unique_email("new")},
        headers=admin,
    )
    await project(engine)
    new_email = (await client.get(f"/api/v1/users/{a}", headers=admin)).json()["email"]

    erased = await client.delete(f"/api/v1/users/{a}?erase=true", headers=admin)
    await project(engine)

    assert erased.status_code == 204
    user = (await client.get(f"/api/v1/users/{a}", headers=admin)).json()
    assert user["email"] == ERASED and user["full_name"] is None
    assert user["is_active"] is False
    history = (await client.get(f"/api/v1/users/{a}/history", headers=admin)).json()
    audit = (await client.get("/api/v1/audit?limit=500", headers=admin)).json()
    assert [i["type"] for i in history["items"]] == [
        "UserRegistered",
        "UserSignedIn",
        "UserEmailChanged",
        "UserProfileUpdated",
        "UserDeleted",
    ]
    assert history["items"][0]["data"]["email"] == ERASED
    assert history["items"][0]["recorded_at"] and history["items"][-1]["actor_id"]
    shown = str(history) + str(audit) + str(user)
    for secret in (email, new_email, "Ann Erased", "Ann"):
        assert secret not in shown
    async with engine.connect() as connection:
        stored = await connection.exec_driver_sql(
            "SELECT concat_ws(' ',"
            " (SELECT string_agg(p::text, ' ') FROM user_profiles p),"
            " (SELECT string_agg(r::text, ' ') FROM user_email_reservations r),"
            " (SELECT string_agg(c::text, ' ') FROM user_credentials c),"
            " (SELECT string_agg(e.data::text, ' ') FROM events e))"
        )
        text = stored.scalar_one()
    for secret in (email, new_email, "Ann Erased"):
        assert secret not in text
    sign_in_again = await client.post(
        "/api/v1/token", data={"username": new_email, "password": PASSWORD}
    )
    assert sign_in_again.status_code == 401


async def test_the_same_email_can_register_again_after_erasure(
    client: httpx.AsyncClient, people: People
) -> None:
    erased = await client.delete(
        f"/api/v1/users/{people.a['id']}?erase=true", headers=people.headers("user A")
    )

    again = await client.post(
        "/api/v1/users/", json={"email": people.a["email"], "password": PASSWORD}
    )

    assert erased.status_code == 204
    assert again.status_code == 201 and again.json()["id"] != people.a["id"]


async def test_a_fresh_rebuild_after_erasure_shows_the_user_erased(
    client: httpx.AsyncClient, people: People, engine: AsyncEngine
) -> None:
    a, email = people.a["id"], people.a["email"]
    admin = people.headers("superuser")
    await client.delete(f"/api/v1/users/{a}?erase=true", headers=admin)
    await project(engine)

    result = await rebuild(engine, users_projection, store=EventStore(engine))

    assert result.generation == 2
    user = (await client.get(f"/api/v1/users/{a}", headers=admin)).json()
    assert user["email"] == ERASED and user["full_name"] is None
    async with engine.connect() as connection:
        rows = await connection.exec_driver_sql(
            "SELECT string_agg(p::text, ' ') FROM user_profiles p"
        )
        assert email not in rows.scalar_one()


async def test_a_rebuild_reproduces_the_live_users_table_row_for_row(
    client: httpx.AsyncClient, people: People, engine: AsyncEngine
) -> None:
    admin = people.headers("superuser")
    a = people.a["id"]
    await client.patch(f"/api/v1/users/{a}", json={"full_name": "R"}, headers=admin)
    await client.patch(f"/api/v1/users/{a}", json={"is_superuser": True}, headers=admin)
    await project(engine)

    store = EventStore(engine)

    # Live, the events went in one batch; rebuilt, in one batch, then one by one.
    assert await verify(engine, users_projection, store=store) == []
    assert await verify(engine, users_projection, store=store, batch_size=1) == []


async def test_the_audit_with_a_helix_position_shows_that_write(
    client: httpx.AsyncClient, people: People, engine: AsyncEngine
) -> None:
    admin = people.headers("superuser")
    a = people.a["id"]
    # An older transaction still open keeps the next write below the audit's
    # read horizon until it ends.
    async with engine.connect() as holder:
        await holder.exec_driver_sql("SELECT pg_current_xact_id()")
        patched = await client.patch(
            f"/api/v1/users/{a}",
            json={"full_name": "Seen"},
            headers=people.headers("user A"),
        )
        assert patched.status_code == 200
        position = {"Helix-Position": patched.headers["Helix-Position"]}
        reading = asyncio.create_task(
            client.get(
                f"/api/v1/audit?stream=user-{a}&type=UserProfileUpdated",
                headers={**admin, **position},
            )
        )
        await asyncio.sleep(0.3)
        assert not reading.done()
        await holder.rollback()
    audit = await reading

    assert audit.status_code == 200, audit.text
    assert [item["data"] for item in audit.json()["items"]] == [{"full_name": "Seen"}]


@pytest.mark.parametrize("route", ["audit", "users/{a}/history", "jobs/{j}/history"])
async def test_the_log_routes_refuse_a_position_that_is_no_position(
    client: httpx.AsyncClient, people: People, route: str
) -> None:
    url = "/api/v1/" + route.format(a=people.a["id"], j=uuid.uuid4())
    response = await client.get(
        url, headers={**people.headers("superuser"), "Helix-Position": "abc"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "Helix-Position"]


async def test_the_history_of_no_user_is_404_on_every_page(
    client: httpx.AsyncClient, people: People
) -> None:
    url = f"/api/v1/users/{uuid.uuid4()}/history"
    for after in (0, 1, 10**6):
        response = await client.get(
            url, params={"after": after}, headers=people.headers("superuser")
        )
        assert response.status_code == 404, (after, response.text)


async def test_a_history_with_a_helix_position_does_not_wait_for_the_horizon(
    client: httpx.AsyncClient, people: People, engine: AsyncEngine
) -> None:
    a = people.a["id"]
    async with engine.connect() as holder:
        # Open for the whole read: the audit could not show what follows.
        await holder.exec_driver_sql("SELECT pg_current_xact_id()")
        patched = await client.patch(
            f"/api/v1/users/{a}",
            json={"full_name": "At once"},
            headers=people.headers("user A"),
        )
        history = await client.get(
            f"/api/v1/users/{a}/history",
            headers={
                **people.headers("user A"),
                "Helix-Position": patched.headers["Helix-Position"],
            },
        )
        await holder.rollback()

    assert history.status_code == 200, history.text
    assert history.json()["items"][-1]["data"] == {"full_name": "At once"}
