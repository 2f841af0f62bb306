"""Dependency checks behind `GET /health/`: each answers up or down, and why."""

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aio_pika
import redis.asyncio as redis
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import connect
from shared.settings import Settings

Check = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


async def run_checks(
    checks: Mapping[str, Check], timeout_s: float
) -> list[CheckResult]:
    """Run every check at once, each bounded by `timeout_s` seconds."""

    async def run(name: str, check: Check) -> CheckResult:
        try:
            await asyncio.wait_for(check(), timeout_s)
        except TimeoutError:
            return CheckResult(name, False, f"no answer within {timeout_s:g}s")
        except Exception as exc:
            return CheckResult(name, False, f"{type(exc).__name__}: {exc}"[:300])
        return CheckResult(name, True, "ok")

    return list(await asyncio.gather(*(run(n, c) for n, c in checks.items())))


def postgres_check(engine: AsyncEngine) -> Check:
    async def check() -> None:
        async with connect(engine) as connection:
            await connection.exec_driver_sql("SELECT 1")

    return check


def redis_check(client: redis.Redis) -> Check:
    async def check() -> None:
        await client.ping()

    return check


def rabbitmq_check(settings: Settings) -> Check:
    async def check() -> None:
        connection = await aio_pika.connect(settings.rabbitmq_url, timeout=2)
        await connection.close()

    return check
