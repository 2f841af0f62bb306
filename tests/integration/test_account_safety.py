"""Accounts stay manageable and sessions stay honest when commands race or repeat."""

import asyncio
from uuid import UUID

import httpx
import jwt
import pytest
import redis.asyncio as redis
from sqlalchemy.ext.asyncio import AsyncEngine

from command_api.setup import seed_first_superuser
from command_api.throttle import SignInThrottle
from command_api.user_commands import (
    CommandContext,
    SignInRefused,
    UserChanges,
    sign_in,
    update_user,
)
from shared.auth import TEST_ARGON2, PasswordHasher, Principal
from shared.event_store import EventStore
from shared.settings import Settings
from shared.users import user_stream
from tests.user_api import (
    PASSWORD,
    bearer,
    gateway_client,
    register,
    settings_with_own_superuser,
    superuser_token,
    unique_email,
)
from tests.user_api import sign_in as token_for


async def admin_of(client: httpx.AsyncClient, settings: Settings) -> tuple[str, dict]:
    """The seeded superuser's id (its token's subject) and header."""
    token = await superuser_token(client, settings)
    claims = jwt.decode(token, options={"verify_signature": False})
    return claims["sub"], bearer(token)


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("PATCH", {"is_superuser": False}),
        ("PATCH", {"is_active": False}),
        ("DELETE", None),
    ],
    ids=["demote", "deactivate", "delete"],
)
async def test_the_last_active_superuser_cannot_remove_itself(
    client: httpx.AsyncClient, app_settings: Settings, method: str, body: dict | None
) -> None:
    admin_id, admin = await admin_of(client, app_settings)

    refused = await client.request(
        method, f"/api/v1/users/{admin_id}", json=body, headers=admin
    )
    second = await register(client, unique_email("second"))
    promoted = await client.patch(
        f"/api/v1/users/{second['id']}", json={"is_superuser": True}, headers=admin
    )
    allowed = await client.request(
        method, f"/api/v1/users/{admin_id}", json=body, headers=admin
    )

    assert refused.status_code == 409, refused.text
    assert "last active superuser" in refused.json()["detail"]
    assert promoted.status_code == 200
    assert allowed.status_code in (200, 204)


async def test_two_superusers_demoting_each_other_at_once_leave_one(
    client: httpx.AsyncClient, app_settings: Settings, engine: AsyncEngine
) -> None:
    admin_id, admin = await admin_of(client, app_settings)
    email = unique_email("second")
    second = await register(client, email)
    await client.patch(
        f"/api/v1/users/{second['id']}", json={"is_superuser": True}, headers=admin
    )
    token = await client.post(
        "/api/v1/token", data={"username": email, "password": PASSWORD}
    )
    other = bearer(token.json()["access_token"])

    answers = await asyncio.gather(
        client.patch(
            f"/api/v1/users/{second['id']}", json={"is_superuser": False}, headers=admin
        ),
        client.patch(
            f"/api/v1/users/{admin_id}", json={"is_superuser": False}, headers=other
        ),
    )

    assert sorted(a.status_code for a in answers) == [200, 409]
    async with engine.connect() as connection:
        left = await connection.exec_driver_sql(
            "SELECT count(*) FROM user_credentials WHERE is_superuser AND is_active"
        )
    assert left.scalar_one() == 1


async def test_setup_does_not_bring_back_a_renamed_first_superuser(
    client: httpx.AsyncClient, app_settings: Settings
) -> None:
    admin_id, admin = await admin_of(client, app_settings)
    configured = app_settings.first_superuser_password.get_secret_value()
    renamed = await client.patch(
        f"/api/v1/users/{admin_id}",
        json={
            "email": unique_email("renamed"),
            "password": "a new admin password",
            "current_password": configured,
        },
        headers=admin,
    )

    again = await seed_first_superuser(app_settings)
    old_credentials = await client.post(
        "/api/v1/token",
        data={"username": app_settings.first_superuser_email, "password": configured},
    )

    assert renamed.status_code == 200, renamed.text
    assert again is None
    assert old_credentials.status_code == 401


class PausingHasher(PasswordHasher):
    """Verifies, then waits until told to go on: a sign-in caught mid-verify."""

    def __init__(self) -> None:
        super().__init__(TEST_ARGON2)
        self.verified = asyncio.Event()
        self.go_on = asyncio.Event()

    async def verify(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        outcome = await super().verify(password, stored_hash)
        self.verified.set()
        await self.go_on.wait()
        return outcome


async def test_a_sign_in_verified_against_a_password_changed_meanwhile_is_refused(
    client: httpx.AsyncClient, app_settings: Settings, store: EventStore
) -> None:
    user = await register(client, unique_email())
    user_id = UUID(user["id"])
    hasher = PasswordHasher.for_settings(app_settings)
    pausing = PausingHasher()
    context = CommandContext(correlation_id="race")

    signing_in = asyncio.create_task(
        sign_in(
            store=store,
            hasher=pausing,
            email=user["email"],
            password=PASSWORD,
            context=context,
        )
    )
    await pausing.verified.wait()
    await update_user(
        store=store,
        hasher=hasher,
        principal=Principal(user_id=user_id, is_superuser=False),
        user_id=user_id,
        changes=UserChanges(password="the new password", current_password=PASSWORD),
        if_match=None,
        context=context,
    )
    pausing.go_on.set()

    with pytest.raises(SignInRefused):
        await signing_in
    events = await store.read_stream(user_stream(user_id))
    assert [e.type for e in events][-2:] == ["UserPasswordChanged", "UserSignInFailed"]


async def test_sign_ins_racing_one_another_through_a_rehash_all_succeed(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    email = unique_email()
    user = await register(client, email)
    older = await PasswordHasher({**TEST_ARGON2, "memory_cost": 512}).hash(PASSWORD)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "UPDATE user_credentials SET password_hash = %s WHERE user_id = %s",
            (older, user["id"]),
        )
    right = {"username": email, "password": PASSWORD}

    answers = await asyncio.gather(
        *(client.post("/api/v1/token", data=right) for _ in range(4))
    )

    assert [a.status_code for a in answers] == [200] * 4


async def test_a_right_current_password_is_no_guess_whatever_the_answer(
    settings: Settings,
) -> None:
    app_settings = settings_with_own_superuser(settings, signin_max_failures=2)
    email, taken = unique_email(), unique_email("taken")
    async with gateway_client(app_settings) as client:
        user = await register(client, email)
        await register(client, taken)
        token = await client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )
        auth = bearer(token.json()["access_token"])
        url = f"/api/v1/users/{user['id']}"
        conflicts = [
            await client.patch(
                url, json={"email": taken, "current_password": PASSWORD}, headers=auth
            )
            for _ in range(3)
        ]
        changed = await client.patch(
            url,
            json={"password": "a new password", "current_password": PASSWORD},
            headers=auth,
        )

    assert [c.status_code for c in conflicts] == [409] * 3
    assert changed.status_code == 200


async def test_guessing_the_current_password_is_throttled(settings: Settings) -> None:
    app_settings = settings_with_own_superuser(settings, signin_max_failures=2)
    email = unique_email()
    async with gateway_client(app_settings) as client:
        user = await register(client, email)
        token = await client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )
        auth = bearer(token.json()["access_token"])
        guesses = [
            await client.patch(
                f"/api/v1/users/{user['id']}",
                json={"password": "taken over!", "current_password": f"guess {i}"},
                headers=auth,
            )
            for i in range(3)
        ]

    assert [g.status_code for g in guesses] == [403, 403, 429]
    assert int(guesses[-1].headers["Retry-After"]) > 0


async def test_a_sign_in_stands_when_redis_fails_to_clear_its_failures(
    settings: Settings,
) -> None:
    gone = redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        # Does not raise: the count would expire with its window anyway.
        await SignInThrottle(gone, settings).succeeded("a@example.com", "10.0.0.1")
    finally:
        await gone.aclose()


@pytest.mark.parametrize(
    "change", [{"is_active": True}, {"full_name": "back"}], ids=["reactivate", "rename"]
)
async def test_a_deleted_account_stays_deleted(
    client: httpx.AsyncClient, app_settings: Settings, change: dict
) -> None:
    _, admin = await admin_of(client, app_settings)
    email = unique_email("deleted")
    user = await register(client, email)
    token = bearer(await token_for(client, email))
    deleted = await client.delete(f"/api/v1/users/{user['id']}", headers=token)
    assert deleted.status_code == 204

    changed = await client.patch(
        f"/api/v1/users/{user['id']}", json=change, headers=admin
    )
    signing_in = await client.post(
        "/api/v1/token", data={"username": email, "password": PASSWORD}
    )
    erased = await client.delete(
        f"/api/v1/users/{user['id']}", params={"erase": "true"}, headers=admin
    )

    assert changed.status_code == 409, changed.text
    assert "deleted" in changed.json()["detail"]
    assert signing_in.status_code == 401
    # Erasure is still open to a superuser.
    assert erased.status_code == 204
