"""`/health/` answers anyone, as often as asked, without a look per request."""

import asyncio

import httpx
from fastapi import FastAPI

from shared.web import add_health_route


def health_app(reuse_s: float) -> tuple[httpx.AsyncClient, list[int]]:
    looks: list[int] = []

    async def rabbitmq() -> None:
        looks.append(1)
        await asyncio.sleep(0.05)  # as a connection to RabbitMQ takes a moment

    app = FastAPI()
    add_health_route(
        app, lambda request: {"rabbitmq": rabbitmq}, timeout_s=2, reuse_s=reuse_s
    )
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    )
    return client, looks


async def test_requests_at_once_or_in_a_row_share_one_look():
    client, looks = health_app(reuse_s=60)
    async with client:
        at_once = await asyncio.gather(*(client.get("/health/") for _ in range(20)))
        in_a_row = [await client.get("/health/") for _ in range(5)]

    assert {r.status_code for r in [*at_once, *in_a_row]} == {200}
    assert len(looks) == 1


async def test_a_look_older_than_the_reuse_time_is_made_again():
    client, looks = health_app(reuse_s=0.1)
    async with client:
        await client.get("/health/")
        await asyncio.sleep(0.2)
        await client.get("/health/")

    assert len(looks) == 2
