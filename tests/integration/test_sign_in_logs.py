"""Each refused sign-in leaves one warning saying why, from where and, when there
is one, for which account; never the email, the password or a token."""

import logging

import pytest

from shared.logging import JsonFormatter
from shared.settings import Settings
from tests.user_api import (
    PASSWORD,
    bearer,
    gateway_client,
    register,
    settings_with_own_superuser,
    superuser_token,
    unique_email,
)

ADDRESS = "10.9.8.7"
GUESS = "hunter2-is-not-it"


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "command_api.token_routes"
        and record.getMessage() == "sign-in refused"
    ]


def fields(record: logging.LogRecord) -> dict[str, object]:
    return {
        name: getattr(record, name, None)
        for name in ("reason", "client_address", "user_id", "retry_after_s")
    }


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    return settings_with_own_superuser(settings, signin_max_failures=1)


async def test_a_sign_in_as_an_unknown_account_is_logged_with_its_address(
    app_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway_client(app_settings, (ADDRESS, 1)) as client:
        response = await client.post(
            "/api/v1/token", data={"username": unique_email(), "password": GUESS}
        )

    assert response.status_code == 401
    (line,) = refusals(caplog)
    assert line.levelno == logging.WARNING
    assert fields(line) == {
        "reason": "unknown_account",
        "client_address": ADDRESS,
        "user_id": None,
        "retry_after_s": None,
    }


async def test_a_wrong_password_then_a_throttled_retry_are_logged_apart(
    app_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    email = unique_email()
    async with gateway_client(app_settings, (ADDRESS, 1)) as client:
        user = await register(client, email)
        caplog.clear()
        wrong = await client.post(
            "/api/v1/token", data={"username": email, "password": GUESS}
        )
        throttled = await client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )

    assert [wrong.status_code, throttled.status_code] == [401, 429]
    first, second = refusals(caplog)
    assert fields(first) == {
        "reason": "wrong_password",
        "client_address": ADDRESS,
        "user_id": user["id"],
        "retry_after_s": None,
    }
    assert fields(second) == {
        "reason": "throttled",
        "client_address": ADDRESS,
        "user_id": None,
        "retry_after_s": int(throttled.headers["Retry-After"]),
    }
    assert second.levelno == logging.WARNING


async def test_a_sign_in_to_a_deactivated_account_is_logged_as_inactive(
    app_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    email = unique_email()
    async with gateway_client(app_settings, (ADDRESS, 1)) as client:
        user = await register(client, email)
        admin = await superuser_token(client, app_settings)
        deactivated = await client.patch(
            f"/api/v1/users/{user['id']}",
            json={"is_active": False},
            headers=bearer(admin),
        )
        assert deactivated.status_code == 200, deactivated.text
        caplog.clear()
        response = await client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )

    assert response.status_code == 401
    (line,) = refusals(caplog)
    assert (line.reason, line.user_id) == ("inactive", user["id"])


async def test_a_password_longer_than_any_stored_is_logged_as_too_long(
    app_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway_client(app_settings, (ADDRESS, 1)) as client:
        response = await client.post(
            "/api/v1/token", data={"username": unique_email(), "password": "x" * 200}
        )

    assert response.status_code == 401
    (line,) = refusals(caplog)
    assert (line.reason, line.client_address) == ("password_too_long", ADDRESS)


async def test_no_line_of_a_sign_in_holds_its_email_password_or_token(
    app_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    email = unique_email()
    async with gateway_client(app_settings, (ADDRESS, 1)) as client:
        await register(client, email)
        await client.post("/api/v1/token", data={"username": email, "password": GUESS})
        await client.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )
    async with gateway_client(app_settings, ("10.9.8.6", 1)) as elsewhere:
        signed_in = await elsewhere.post(
            "/api/v1/token", data={"username": email, "password": PASSWORD}
        )
    assert signed_in.status_code == 200
    token = signed_in.json()["access_token"]

    assert len(refusals(caplog)) == 2
    written = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for secret in (email, email.split("@")[0], GUESS, PASSWORD, token):
        assert secret not in written
