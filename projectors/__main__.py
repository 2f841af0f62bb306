"""Run the relay, the projections and the job dispatcher until SIGINT or SIGTERM."""

import asyncio
import logging
import signal

import uvloop

from projectors.runner import run
from shared.logging import configure_logging
from shared.settings import get_settings

log = logging.getLogger("projectors")


async def main() -> None:
    settings = get_settings()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await run(settings, stopping)
    log.info("projectors stopped")


if __name__ == "__main__":
    configure_logging(get_settings())
    uvloop.run(main())
