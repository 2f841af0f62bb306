"""Wake-ups for requests that wait for a job: `GET /api/v1/jobs/{id}?wait=S`.

The jobs projection sends NOTIFY on `helix_jobs` with the job id whenever a job's
status changes. One connection per process listens, and wakes the requests
waiting on that job. A notification is only a hint (it is lost while the
listening connection is down), so waiters also look again every second. On a hot
standby, which sends no notifications, they look again every 100 ms instead.
"""

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator
from uuid import UUID

from shared.log_listener import JOBS_CHANNEL, NotificationListener

# How often a waiter looks again without a wake-up.
RECHECK_S = 1.0
STANDBY_RECHECK_S = 0.1


class JobWaits(NotificationListener):
    channel = JOBS_CHANNEL

    def __init__(self, dsn: str, **delays_s: float) -> None:
        super().__init__(dsn, **delays_s)
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    @property
    def recheck_s(self) -> float:
        """How long a waiter may go without looking again."""
        return STANDBY_RECHECK_S if self.on_standby else RECHECK_S

    @contextlib.contextmanager
    def watch(self, job_id: UUID) -> Iterator[asyncio.Event]:
        """An event set whenever job `job_id` changes, while the block runs."""
        # Listens from the first wait on: processes that never wait hold no
        # extra connection.
        self._listen_in_background()
        key = str(job_id)
        woken = asyncio.Event()
        self._waiters[key].add(woken)
        try:
            yield woken
        finally:
            self._waiters[key].discard(woken)
            if not self._waiters[key]:
                del self._waiters[key]

    def _connected(self) -> None:
        # Jobs may have changed while nobody listened.
        for waiters in self._waiters.values():
            for woken in waiters:
                woken.set()

    def _notified(self, payload: str) -> None:
        for woken in self._waiters.get(payload, ()):
            woken.set()
