"""User commands over HTTP against real PostgreSQL and Redis (both APIs in process)."""

import asyncio

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncEngine

from command_api.user_commands import CommandContext, SignInRefused
from command_api.user_commands import sign_in as sign_in_command
from shared import pii
from shared.auth import TEST_ARGON2, PasswordHasher
from shared.event_store import EventStore
from shared.settings import Settings
from tests.user_api import (
    PASSWORD,
    bearer,
    gateway_client,
    register,
    settings_with_own_superuser,
    sign_in,
    superuser_token,
    unique_email,
)


async def test_registration_answers_201_with_location_position_and_etag(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()

    response = await client.post(
        "/api/v1/users/",
        json={"email": email, "password": PASSWORD, "full_name": "Ada Lovelace"},
    )

    assert response.status_code == 201
    user = response.json()
    assert set(user) == {
        "id",
        "email",
        "full_name",
        "is_active",
        "is_superuser",
        "created_at",
        "updated_at",
    }
    assert user["email"] == email
    assert user["is_active"] and not user["is_superuser"]
    assert response.headers["Location"] == f"/api/v1/users/{user['id']}"
    assert int(response.headers["Helix-Position"]) > 0
    assert response.headers["ETag"]


async def test_email_is_unique_whatever_its_case_and_spaces(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    await register(client, email)

    response = await client.post(
        "/api/v1/users/", json={"email": f"  {email.upper()} ", "password": PASSWORD}
    )

    assert response.status_code == 409


async def test_concurrent_registrations_of_one_email_give_one_201_and_the_rest_409(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    email = unique_email()
    body = {"email": email, "password": PASSWORD}

    responses = await asyncio.gather(
        *(client.post("/api/v1/users/", json=body) for _ in range(8))
    )

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 7
    async with engine.connect() as connection:
        count = await connection.exec_driver_sql(
            "SELECT count(*) FROM events WHERE type = 'UserRegistered'"
        )
        assert count.scalar_one() == 1


async def test_password_hash_and_clear_email_never_enter_the_log(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    email = unique_email()
    user = await register(client, email, full_name="Grace Hopper")
    token = await sign_in(client, email)
    await client.patch(
        f"/api/v1/users/{user['id']}",
        json={"password": "another password", "current_password": PASSWORD},
        headers=bearer(token),
    )

    async with engine.connect() as connection:
        log = await connection.exec_driver_sql(
            "SELECT string_agg(data::text, ' ') FROM events"
        )
        text = log.scalar_one()
    assert email not in text and "Grace Hopper" not in text
    assert "argon2" not in text and PASSWORD not in text


async def stored_key(engine: AsyncEngine, user_id: str) -> bytes:
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(
            "SELECT key FROM user_keys WHERE user_id = %s", (user_id,)
        )
        return bytes(result.scalar_one())


async def test_a_copy_of_the_database_alone_does_not_reveal_personal_data(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    email = unique_email()
    user = await register(client, email)
    stored = await stored_key(engine, user["id"])
    async with engine.connect() as connection:
        sealed = (
            await connection.exec_driver_sql(
                "SELECT data->>'email' FROM events"
                " WHERE stream_id = %s AND type = 'UserRegistered'",
                (f"user-{user['id']}",),
            )
        ).scalar_one()

    # The stored key is wrapped: not a key at all without the master key.
    with pytest.raises(ValueError):
        Fernet(stored)
    assert pii.decrypt(pii.unwrap(stored), sealed) == email


async def test_a_key_stored_before_keys_were_wrapped_still_reads(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    email = unique_email()
    user = await register(client, email)
    key = pii.unwrap(await stored_key(engine, user["id"]))
    async with engine.begin() as connection:
        # As an older version stored it: the key itself.
        await connection.exec_driver_sql(
            "UPDATE user_keys SET key = %s WHERE user_id = %s", (key, user["id"])
        )
    token = await sign_in(client, email)

    history = await client.get(
        f"/api/v1/users/{user['id']}/history", headers=bearer(token)
    )

    assert history.status_code == 200
    assert history.json()["items"][0]["data"]["email"] == email


async def test_anonymous_cannot_create_a_superuser_but_a_superuser_can(
    client: httpx.AsyncClient, app_settings: Settings
) -> None:
    body = {"email": unique_email(), "password": PASSWORD, "is_superuser": True}

    anonymous = await client.post("/api/v1/users/", json=body)
    admin = await superuser_token(client, app_settings)
    by_superuser = await client.post("/api/v1/users/", json=body, headers=bearer(admin))

    assert anonymous.status_code == 403
    assert by_superuser.status_code == 201
    assert by_superuser.json()["is_superuser"] is True


async def test_sign_in_returns_a_bearer_token_with_its_lifetime(
    client: httpx.AsyncClient, app_settings: Settings
) -> None:
    email = unique_email()
    await register(client, email)

    response = await client.post(
        "/api/v1/token", data={"username": email.upper(), "password": PASSWORD}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == app_settings.access_token_minutes * 60
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("grant_type", "status"),
    [("password", 200), ("client_credentials", 400), ("refresh_token", 400)],
)
async def test_sign_in_takes_the_password_grant_only(
    client: httpx.AsyncClient, grant_type: str, status: int
) -> None:
    email = unique_email()
    await register(client, email)

    response = await client.post(
        "/api/v1/token",
        data={"grant_type": grant_type, "username": email, "password": PASSWORD},
    )

    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"] == "unsupported_grant_type"
        assert "access_token" not in response.json()


@pytest.mark.parametrize(
    "known_email", [True, False], ids=["wrong-password", "unknown"]
)
async def test_failed_sign_in_is_401_asking_for_bearer_and_never_says_why(
    client: httpx.AsyncClient, known_email: bool
) -> None:
    email = unique_email()
    if known_email:
        await register(client, email)

    response = await client.post(
        "/api/v1/token", data={"username": email, "password": "not the password"}
    )

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json() == {"detail": "incorrect email or password"}


async def test_sign_ins_are_audited_on_the_users_stream(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    email = unique_email()
    user = await register(client, email)
    await client.post("/api/v1/token", data={"username": email, "password": "wrong!!!"})
    await sign_in(client, email)

    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(
            "SELECT type, data->>'reason' FROM events WHERE stream_id = %s"
            " ORDER BY version",
            (f"user-{user['id']}",),
        )
        rows = [tuple(row) for row in result]
    assert rows == [
        ("UserRegistered", None),
        ("UserSignInFailed", "wrong_password"),
        ("UserSignedIn", None),
    ]


async def test_sixth_failed_sign_in_from_one_address_is_429_with_retry_after(
    settings: Settings,
) -> None:
    app_settings = settings_with_own_superuser(settings, signin_max_failures=5)
    email = unique_email()
    async with gateway_client(app_settings, ("10.1.1.1", 1)) as client:
        await register(client, email)
        failures = [
            await client.post(
                "/api/v1/token", data={"username": email, "password": "wrong pass"}
            )
            for _ in range(5)
        ]
        refused = await client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )
    async with gateway_client(app_settings, ("10.2.2.2", 1)) as elsewhere:
        other_address = await elsewhere.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )

    assert [r.status_code for r in failures] == [401] * 5
    assert refused.status_code == 429
    window = app_settings.signin_failure_window_s
    assert 0 < int(refused.headers["Retry-After"]) <= window
    assert other_address.status_code == 200


async def test_parallel_guesses_get_no_more_tries_than_the_limit(
    settings: Settings,
) -> None:
    app_settings = settings_with_own_superuser(settings, signin_max_failures=5)
    email = unique_email()
    async with gateway_client(app_settings, ("10.4.4.4", 1)) as client:
        await register(client, email)
        wrong = {"username": email, "password": "wrong pass"}

        responses = await asyncio.gather(
            *(client.post("/api/v1/token", data=wrong) for _ in range(12))
        )

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [401] * 5 + [429] * 7


async def test_successful_sign_in_resets_the_failure_count(settings: Settings) -> None:
    app_settings = settings_with_own_superuser(settings, signin_max_failures=2)
    email = unique_email()
    async with gateway_client(app_settings, ("10.3.3.3", 1)) as client:
        await register(client, email)
        wrong = {"username": email, "password": "wrong pass"}
        await client.post("/api/v1/token", data=wrong)
        await sign_in(client, email)
        await client.post("/api/v1/token", data=wrong)
        after_one_more = await client.post("/api/v1/token", data=wrong)

    assert after_one_more.status_code == 401


async def test_an_outdated_hash_is_upgraded_at_sign_in(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    email = unique_email()
    user = await register(client, email)
    older = PasswordHasher({**TEST_ARGON2, "memory_cost": 512})
    old_hash = await older.hash(PASSWORD)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "UPDATE user_credentials SET password_hash = %s WHERE user_id = %s",
            (old_hash, user["id"]),
        )

    await sign_in(client, email)

    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(
            "SELECT password_hash FROM user_credentials WHERE user_id = %s",
            (user["id"],),
        )
        new_hash = result.scalar_one()
    assert new_hash != old_hash and "m=1024" in new_hash
    await sign_in(client, email)


async def test_patch_with_a_stale_if_match_is_412_and_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    user = await register(client, email, full_name="First")
    token = await sign_in(client, email)
    url = f"/api/v1/users/{user['id']}"
    first = await client.patch(url, json={"full_name": "Second"}, headers=bearer(token))
    stale_etag = '"1"'

    conflicting = await client.patch(
        url,
        json={"full_name": "Third"},
        headers={**bearer(token), "If-Match": stale_etag},
    )
    current = await client.patch(
        url,
        json={"full_name": "Fourth"},
        headers={**bearer(token), "If-Match": first.headers["ETag"]},
    )

    assert first.status_code == 200 and first.headers["ETag"] != stale_etag
    assert conflicting.status_code == 412
    assert current.status_code == 200
    assert current.json()["full_name"] == "Fourth"


async def test_two_editors_with_one_etag_cannot_both_win(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    user = await register(client, email)
    token = await sign_in(client, email)
    url = f"/api/v1/users/{user['id']}"
    etag = await client.patch(url, json={"full_name": "Base"}, headers=bearer(token))
    headers = {**bearer(token), "If-Match": etag.headers["ETag"]}

    responses = await asyncio.gather(
        *(
            client.patch(url, json={"full_name": f"Editor {n}"}, headers=headers)
            for n in range(4)
        )
    )

    assert sorted(r.status_code for r in responses) == [200, 412, 412, 412]


async def test_a_sign_in_does_not_change_the_etag(client: httpx.AsyncClient) -> None:
    email = unique_email()
    user = await register(client, email)
    token = await sign_in(client, email)
    url = f"/api/v1/users/{user['id']}"
    before = await client.patch(url, json={"full_name": "Name"}, headers=bearer(token))

    await sign_in(client, email)
    after = await client.patch(
        url,
        json={"full_name": "Other name"},
        headers={**bearer(token), "If-Match": before.headers["ETag"]},
    )

    assert after.status_code == 200


async def test_changing_your_own_email_or_password_needs_the_current_password(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    user = await register(client, email)
    token = await sign_in(client, email)
    url = f"/api/v1/users/{user['id']}"
    new_email = unique_email("renamed")

    missing = await client.patch(url, json={"email": new_email}, headers=bearer(token))
    wrong = await client.patch(
        url,
        json={"email": new_email, "current_password": "not it at all"},
        headers=bearer(token),
    )
    right = await client.patch(
        url,
        json={"email": new_email, "current_password": PASSWORD},
        headers=bearer(token),
    )

    assert missing.status_code == 422
    assert wrong.status_code == 403
    assert right.status_code == 200 and right.json()["email"] == new_email
    await sign_in(client, new_email)
    stale = await client.post(
        "/api/v1/token", data={"username": email, "password": PASSWORD}
    )
    assert stale.status_code == 401


async def test_an_email_taken_by_another_user_is_409_on_patch(
    client: httpx.AsyncClient,
) -> None:
    taken = unique_email()
    await register(client, taken)
    email = unique_email()
    user = await register(client, email)
    token = await sign_in(client, email)

    response = await client.patch(
        f"/api/v1/users/{user['id']}",
        json={"email": taken, "current_password": PASSWORD},
        headers=bearer(token),
    )

    assert response.status_code == 409


async def test_a_password_change_lets_the_new_password_in_and_ends_old_tokens(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    user = await register(client, email)
    token = await sign_in(client, email)

    response = await client.patch(
        f"/api/v1/users/{user['id']}",
        json={"password": "a brand new one", "current_password": PASSWORD},
        headers=bearer(token),
    )

    assert response.status_code == 200
    old_token = await client.get("/api/v1/users/me", headers=bearer(token))
    assert old_token.status_code == 401
    await sign_in(client, email, "a brand new one")
    old = await client.post(
        "/api/v1/token", data={"username": email, "password": PASSWORD}
    )
    assert old.status_code == 401


async def user_beside_a_superuser(
    client: httpx.AsyncClient, app_settings: Settings
) -> tuple[str, str, str, str]:
    """A new user's email, URL and token, and a superuser's token."""
    email = unique_email()
    user = await register(client, email)
    token = await sign_in(client, email)
    admin = await superuser_token(client, app_settings)
    return email, f"/api/v1/users/{user['id']}", token, admin


async def test_only_a_superuser_changes_roles_and_activation(
    client: httpx.AsyncClient, app_settings: Settings
) -> None:
    _, url, token, admin = await user_beside_a_superuser(client, app_settings)

    self_promotion = await client.patch(
        url, json={"is_superuser": True}, headers=bearer(token)
    )
    promotion = await client.patch(
        url, json={"is_superuser": True}, headers=bearer(admin)
    )

    assert self_promotion.status_code == 403
    assert promotion.status_code == 200 and promotion.json()["is_superuser"] is True


async def test_deactivation_by_a_superuser_ends_the_users_tokens(
    client: httpx.AsyncClient, app_settings: Settings
) -> None:
    email, url, token, admin = await user_beside_a_superuser(client, app_settings)

    deactivated = await client.patch(
        url, json={"is_active": False}, headers=bearer(admin)
    )
    with_old_token = await client.patch(
        url, json={"full_name": "x"}, headers=bearer(token)
    )

    assert deactivated.status_code == 200 and deactivated.json()["is_active"] is False
    assert with_old_token.status_code == 401
    reactivated = await client.patch(
        url, json={"is_active": True}, headers=bearer(admin)
    )
    assert reactivated.status_code == 200
    new_token = await sign_in(client, email)
    assert (
        await client.get("/api/v1/users/me", headers=bearer(token))
    ).status_code == 401
    me = await client.patch(url, json={"full_name": "y"}, headers=bearer(new_token))
    assert me.status_code == 200


async def test_delete_refuses_sign_in_and_old_tokens_on_both_apis(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    user = await register(client, email)
    token = await sign_in(client, email)
    url = f"/api/v1/users/{user['id']}"

    deleted = await client.delete(url, headers=bearer(token))

    assert deleted.status_code == 204
    assert int(deleted.headers["Helix-Position"]) > 0
    sign_in_again = await client.post(
        "/api/v1/token", data={"username": email, "password": PASSWORD}
    )
    assert sign_in_again.status_code == 401
    command = await client.patch(url, json={"full_name": "x"}, headers=bearer(token))
    query = await client.get("/api/v1/users/me", headers=bearer(token))
    history = await client.get(f"{url}/history", headers=bearer(token))
    for refused in (command, query, history):
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"


async def test_deleting_twice_changes_nothing_the_second_time(
    client: httpx.AsyncClient, engine: AsyncEngine, app_settings: Settings
) -> None:
    user = await register(client)
    admin = await superuser_token(client, app_settings)
    url = f"/api/v1/users/{user['id']}"

    first = await client.delete(url, headers=bearer(admin))
    second = await client.delete(url, headers=bearer(admin))

    assert first.status_code == second.status_code == 204
    assert first.headers["Helix-Position"] == second.headers["Helix-Position"]
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(
            "SELECT count(*) FROM events WHERE type = 'UserDeleted'"
        )
        assert result.scalar_one() == 1


class CountingHasher(PasswordHasher):
    """The real hasher, counting the argon2 verifications it runs."""

    def __init__(self) -> None:
        super().__init__(TEST_ARGON2)
        self.verifications = 0

    async def verify(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        self.verifications += 1
        return await super().verify(password, stored_hash)


@pytest.mark.parametrize(
    "known_email", [True, False], ids=["wrong-password", "unknown"]
)
async def test_an_unknown_email_costs_one_verification_like_a_wrong_password(
    client: httpx.AsyncClient, store: EventStore, known_email: bool
) -> None:
    email = unique_email()
    if known_email:
        await register(client, email)
    hasher = CountingHasher()

    with pytest.raises(SignInRefused):
        await sign_in_command(
            store=store,
            hasher=hasher,
            email=email,
            password="not the password",
            context=CommandContext(correlation_id=None),
        )

    assert hasher.verifications == 1


async def test_sign_in_is_503_not_500_while_redis_is_unreachable(
    settings: Settings,
) -> None:
    unreachable = settings_with_own_superuser(
        settings, redis_url="redis://127.0.0.1:9/15"
    )
    email = unique_email()
    async with gateway_client(unreachable) as client:
        await register(client, email)

        response = await client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )

    assert response.status_code == 503
    assert response.headers["Retry-After"]
