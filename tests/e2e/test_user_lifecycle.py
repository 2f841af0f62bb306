"""The whole life of a user against the running service: gateway and projectors."""

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import create_engine, text

from command_api.setup import seed_first_superuser
from shared.pii import ERASED
from shared.settings import Settings
from tests.stack import ServiceStack, running_stack, settings_for

PASSWORD = "correct horse battery"


def unique_email(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}@example.com"


@pytest.fixture
def stack_settings(database_url: str) -> Settings:
    return settings_for(database_url, first_superuser_email=unique_email("admin"))


@pytest.fixture
def stack(stack_settings: Settings) -> Iterator[ServiceStack]:
    asyncio.run(seed_first_superuser(stack_settings))
    with running_stack(stack_settings) as stack:
        yield stack


def sign_in(client: httpx.Client, email: str, password: str = PASSWORD) -> str:
    response = client.post(
        "/api/v1/token", data={"username": email, "password": password}
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def auth(token: str, position: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if position is not None:
        headers["Helix-Position"] = position
    return headers


def test_a_user_registers_signs_in_reads_updates_and_is_deleted(
    stack: ServiceStack,
) -> None:
    email = unique_email("life")
    with stack.client() as client:
        registered = client.post(
            "/api/v1/users/",
            json={"email": email, "password": PASSWORD, "full_name": "Lin"},
        )
        assert registered.status_code == 201
        user = registered.json()
        token = sign_in(client, email)

        me = client.get(
            "/api/v1/users/me",
            headers=auth(token, registered.headers["Helix-Position"]),
        )
        assert me.status_code == 200 and me.json() == user

        updated = client.patch(
            f"/api/v1/users/{user['id']}",
            json={"full_name": "Lin Updated"},
            headers=auth(token),
        )
        assert updated.status_code == 200
        read_back = client.get(
            f"/api/v1/users/{user['id']}",
            headers=auth(token, updated.headers["Helix-Position"]),
        )
        assert read_back.json()["full_name"] == "Lin Updated"
        assert read_back.headers["ETag"] == updated.headers["ETag"]

        deleted = client.delete(f"/api/v1/users/{user['id']}", headers=auth(token))
        assert deleted.status_code == 204
        refused = client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )
        assert refused.status_code == 401
        for response in (
            client.get("/api/v1/users/me", headers=auth(token)),
            client.patch(
                f"/api/v1/users/{user['id']}",
                json={"full_name": "x"},
                headers=auth(token),
            ),
        ):
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"

        admin = sign_in(
            client,
            stack.settings.first_superuser_email,
            stack.settings.first_superuser_password.get_secret_value(),
        )
        seen_by_admin = client.get(
            f"/api/v1/users/{user['id']}",
            headers=auth(admin, deleted.headers["Helix-Position"]),
        )
        assert seen_by_admin.json()["is_active"] is False
        listing = client.get("/api/v1/users/", headers=auth(admin))
        assert user["id"] not in {item["id"] for item in listing.json()["items"]}
        history = client.get(f"/api/v1/users/{user['id']}/history", headers=auth(admin))
        assert [item["type"] for item in history.json()["items"]] == [
            "UserRegistered",
            "UserSignedIn",
            "UserProfileUpdated",
            "UserDeleted",
            "UserSignInFailed",
        ]


def test_after_erasure_no_read_table_history_or_audit_shows_the_email(
    stack: ServiceStack,
) -> None:
    email = unique_email("erase")
    with stack.client() as client:
        registered = client.post(
            "/api/v1/users/",
            json={"email": email, "password": PASSWORD, "full_name": "Eve Erased"},
        )
        user_id = registered.json()["id"]
        token = sign_in(client, email)
        erased = client.delete(
            f"/api/v1/users/{user_id}?erase=true", headers=auth(token)
        )
        assert erased.status_code == 204

        admin = sign_in(
            client,
            stack.settings.first_superuser_email,
            stack.settings.first_superuser_password.get_secret_value(),
        )
        position = erased.headers["Helix-Position"]
        user = client.get(f"/api/v1/users/{user_id}", headers=auth(admin, position))
        history = client.get(f"/api/v1/users/{user_id}/history", headers=auth(admin))
        audit = client.get("/api/v1/audit?limit=500", headers=auth(admin))

    assert user.json()["email"] == ERASED
    assert [i["type"] for i in history.json()["items"]] == [
        "UserRegistered",
        "UserSignedIn",
        "UserDeleted",
    ]
    for answer in (user.text, history.text, audit.text):
        assert email not in answer and "Eve Erased" not in answer
    engine = create_engine(stack.settings.database_url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(
                text(
                    "SELECT concat_ws(' ',"
                    " (SELECT string_agg(p::text, ' ') FROM user_profiles p),"
                    " (SELECT string_agg(r::text, ' ') FROM user_email_reservations r),"
                    " (SELECT string_agg(e.data::text, ' ') FROM events e))"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    assert email not in stored and "Eve Erased" not in stored
