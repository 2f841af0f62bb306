"""Run the relay, the projections and the job dispatcher until SIGINT or SIGTERM."""

import asyncio
import logging
import signal

import uvloop

from projectors.runner import run
from shared.db import name_sessions
from shared.logging import configure_logging
from shared.settings import get_settings

log = logging.getLogger("projectors")


async def main() -> None:
    settings = get_settings()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await run(settings, stopping)
    except Exception:
        # In the log's own format (JSON in production), not a bare traceback.
        log.exception("projectors failed")
        raise SystemExit(1) from None
    log.info("projectors stopped")


if __name__ == "__main__":
    configure_logging(get_settings())
    name_sessions("projectors")
    uvloop.run(main())
