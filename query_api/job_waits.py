"""Wake-ups for requests that wait for a job: `GET /api/v1/jobs/{id}?wait=S`.

The jobs projection sends NOTIFY on `helix_jobs` with the job id whenever a job's
status changes. One connection per process listens, and wakes the requests
waiting on that job. A notification is only a hint (it is lost while the
listening connection is down), so waiters also look again every second.
"""

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from uuid import UUID

import psycopg

log = logging.getLogger(__name__)

JOBS_CHANNEL = "helix_jobs"


class JobWaits:
    def __init__(self, dsn: str, *, reconnect_delay_s: float = 1.0) -> None:
        self._dsn = dsn
        self._reconnect_delay_s = reconnect_delay_s
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @contextlib.contextmanager
    def watch(self, job_id: UUID) -> Iterator[asyncio.Event]:
        """An event set whenever job `job_id` changes, while the block runs."""
        if self._task is None:
            # Listens from the first wait on: processes that never wait hold
            # no extra connection.
            self._task = asyncio.create_task(self._listen(), name="job-waits")
        key = str(job_id)
        woken = asyncio.Event()
        self._waiters[key].add(woken)
        try:
            yield woken
        finally:
            self._waiters[key].discard(woken)
            if not self._waiters[key]:
                del self._waiters[key]

    async def _listen(self) -> None:
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=5
                )
                async with connection:
                    await connection.execute(f"LISTEN {JOBS_CHANNEL}")
                    # Jobs may have changed while nobody listened.
                    self._wake_all()
                    async for notification in connection.notifies():
                        for woken in self._waiters.get(notification.payload, ()):
                            woken.set()
            except psycopg.Error as exc:
                log.warning(
                    "job listener disconnected, retrying", extra={"error": str(exc)}
                )
                await asyncio.sleep(self._reconnect_delay_s)

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for woken in waiters:
                woken.set()
