"""The job dispatcher: turns JobSubmitted into a Celery task."""

import asyncio

from shared.settings import Settings


async def run_dispatcher(settings: Settings, stopping: asyncio.Event) -> None:
    await stopping.wait()
