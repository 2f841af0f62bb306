"""Helpers for tests that drive the user routes over HTTP."""

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from command_api.app import create_app as create_command_app
from command_api.setup import seed_first_superuser
from gateway.app import Gateway
from query_api.app import create_app as create_query_app
from shared.settings import Settings

PASSWORD = "correct horse battery"


def unique_email(label: str = "user") -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}@example.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def signed_in(client: httpx.Client, label: str = "user") -> dict[str, str]:
    """Register a new user through a running service and sign it in: its header."""
    credentials = {"email": unique_email(label), "password": PASSWORD}
    client.post("/api/v1/users/", json=credentials).raise_for_status()
    response = client.post(
        "/api/v1/token",
        data={"username": credentials["email"], "password": PASSWORD},
    )
    response.raise_for_status()
    return bearer(response.json()["access_token"])


@asynccontextmanager
async def gateway_client(
    settings: Settings, client_address: tuple[str, int] = ("10.0.0.1", 40000)
) -> AsyncIterator[httpx.AsyncClient]:
    """Both APIs in this process, their lifespans running, behind one client."""
    gateway = Gateway(create_command_app(settings), create_query_app(settings))
    transport = httpx.ASGITransport(app=gateway, client=client_address)
    async with (
        gateway.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://helix.test") as client,
    ):
        yield client


async def register(
    client: httpx.AsyncClient,
    email: str | None = None,
    password: str = PASSWORD,
    **fields: Any,
) -> dict[str, Any]:
    body = {"email": email or unique_email(), "password": password, **fields}
    response = await client.post("/api/v1/users/", json=body)
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


async def sign_in(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> str:
    response = await client.post(
        "/api/v1/token", data={"username": email, "password": password}
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def superuser_token(client: httpx.AsyncClient, settings: Settings) -> str:
    """Seed the settings' first superuser (once) and sign it in."""
    await seed_first_superuser(settings)
    return await sign_in(
        client,
        settings.first_superuser_email,
        settings.first_superuser_password.get_secret_value(),
    )


def settings_with_own_superuser(settings: Settings, **overrides: Any) -> Settings:
    """The settings with a first superuser no other test signs in as."""
    return settings.model_copy(
        update={"first_superuser_email": unique_email("admin"), **overrides}
    )
