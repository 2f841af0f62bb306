"""Bad input on the user and token routes: 401, 413 or 422 with a detail, never 500."""

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest

from shared.auth import create_access_token
from shared.settings import Settings
from tests.user_api import (
    PASSWORD,
    bearer,
    register,
    sign_in,
    superuser_token,
    unique_email,
)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "a@b@example.com", "password": PASSWORD}, "email"),
        ({"email": "ok@example.com", "password": "short"}, "password"),
        ({"email": "ok@example.com", "password": "x" * 129}, "password"),
        ({"email": "ok@example.com"}, "password"),
        ({"email": "ok@example.com", "password": PASSWORD, "role": "x"}, "role"),
        (
            {"email": "ok@example.com", "password": PASSWORD, "is_active": 1},
            "is_active",
        ),
        (
            {"email": "ok@example.com", "password": PASSWORD, "full_name": ""},
            "full_name",
        ),
        ({"email": ["a"], "password": PASSWORD}, "email"),
    ],
    ids=[
        "invalid-email",
        "two-at-signs",
        "short-password",
        "long-password",
        "missing-password",
        "unknown-field",
        "is-active-not-allowed",
        "empty-full-name",
        "email-not-a-string",
    ],
)
async def test_a_bad_registration_is_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, object], field: str
) -> None:
    response = await client.post("/api/v1/users/", json=body)

    assert response.status_code == 422
    assert field in str(response.json()["detail"])


async def test_a_body_that_is_not_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/users/",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 422


async def test_an_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    body = {"email": unique_email(), "password": PASSWORD, "full_name": "x" * 2**21}

    response = await client.post("/api/v1/users/", json=body)

    assert response.status_code == 413
    assert "detail" in response.json()


@pytest.mark.parametrize(
    "body",
    [
        {"password": None},
        {"email": None},
        {"full_name": "x" * 201},
        {"password": "short"},
        {"unknown": True},
        {"is_superuser": "maybe"},
    ],
    ids=["null-password", "null-email", "long-name", "short", "unknown", "not-bool"],
)
async def test_a_bad_patch_is_422(
    client: httpx.AsyncClient, body: dict[str, object]
) -> None:
    email = unique_email()
    user = await register(client, email)
    token = await sign_in(client, email)

    response = await client.patch(
        f"/api/v1/users/{user['id']}", json=body, headers=bearer(token)
    )

    assert response.status_code == 422


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/users/not-a-uuid"),
        ("PATCH", "/api/v1/users/not-a-uuid"),
        ("DELETE", "/api/v1/users/123"),
        ("GET", "/api/v1/users/not-a-uuid/history"),
        ("GET", "/api/v1/jobs/not-a-uuid/history"),
        ("GET", "/api/v1/audit?actor_id=nope"),
        ("GET", "/api/v1/audit?since=yesterday"),
        ("GET", "/api/v1/users/me/history?after=-1"),
    ],
)
async def test_a_malformed_id_or_filter_is_422(
    client: httpx.AsyncClient, app_settings: Settings, method: str, path: str
) -> None:
    token = await superuser_token(client, app_settings)

    response = await client.request(method, path, json={}, headers=bearer(token))

    assert response.status_code == 422


def forged(settings: Settings, **claims: object) -> str:
    now = datetime.now(UTC)
    payload: dict[str, object] = {
        "sub": str(uuid.uuid4()),
        "iat": now,
        "exp": now + timedelta(minutes=5),
        "jti": str(uuid.uuid4()),
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        **claims,
    }
    return jwt.encode(payload, settings.jwt_secret.get_secret_value(), "HS256")


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not-bearer",
        "malformed",
        "expired",
        "forged",
        "alg-none",
        "wrong-audience",
        "unknown-user",
    ],
)
async def test_a_bad_token_is_401_asking_for_bearer(
    client: httpx.AsyncClient,
    app_settings: Settings,
    case: str,
) -> None:
    email = unique_email()
    user = await register(client, email)
    valid = await sign_in(client, email)
    user_id = user["id"]
    now = datetime.now(UTC)
    headers = {
        "missing": {},
        "not-bearer": {"Authorization": f"Basic {valid}"},
        "malformed": bearer("abc.def.ghi"),
        "expired": bearer(
            forged(app_settings, sub=user_id, exp=now - timedelta(seconds=5))
        ),
        "forged": bearer(
            jwt.encode(
                jwt.decode(valid, options={"verify_signature": False}),
                "another secret of sufficient length!",
                "HS256",
            )
        ),
        "alg-none": bearer(
            jwt.encode(
                jwt.decode(valid, options={"verify_signature": False}), None, "none"
            )
        ),
        "wrong-audience": bearer(forged(app_settings, sub=user_id, aud="other")),
        "unknown-user": bearer(create_access_token(app_settings, uuid.uuid4()).token),
    }[case]

    routes = [
        ("GET", "/api/v1/users/me"),
        ("GET", f"/api/v1/users/{user_id}/history"),
        ("GET", "/api/v1/audit"),
        ("PATCH", f"/api/v1/users/{user_id}"),
        ("DELETE", f"/api/v1/users/{user_id}"),
    ]

    for method, path in routes:
        response = await client.request(
            method, path, json={"full_name": "x"}, headers=headers
        )
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "detail" in response.json()


@pytest.mark.parametrize(
    "form",
    [
        {"username": "someone@example.com"},
        {"password": PASSWORD},
        {},
    ],
    ids=["no-password", "no-username", "empty"],
)
async def test_an_incomplete_token_request_is_422(
    client: httpx.AsyncClient, form: dict[str, str]
) -> None:
    response = await client.post("/api/v1/token", data=form)

    assert response.status_code == 422


async def test_an_absurdly_long_password_at_sign_in_is_just_a_failed_sign_in(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    await register(client, email)

    response = await client.post(
        "/api/v1/token", data={"username": email, "password": "p" * 4000}
    )

    assert response.status_code == 401
