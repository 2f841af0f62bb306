"""Wake-ups for readers of the log, over PostgreSQL's LISTEN/NOTIFY.

Appenders send a NOTIFY after their events commit (`notify_tailers`); tailers wait
for one (`LogListener`). A notification is only a hint: it can be lost while the
listening connection is down, and it can arrive before the event is below the read
horizon. Readers wait for a wake-up *or* a poll interval, whichever comes first, so
they never depend on it.

`NotificationListener` is the reconnecting LISTEN loop under `LogListener`, and
under the query API's wake-ups for jobs (on `JOBS_CHANNEL`). A hot standby takes no
LISTEN (notifications exist only on the primary): on one, the listener says so once,
`on_standby` turns true so that waiters poll more often, and it tries again now and
then, in case the standby was promoted.
"""

import asyncio
import contextlib
import logging

import psycopg

from shared.db import connect_options

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "helix_events"
# The jobs projection's: the id of a job whose status changed, at commit.
JOBS_CHANNEL = "helix_jobs"


async def notify_tailers(driver: psycopg.AsyncConnection) -> None:
    """Wake the log's tailers, on a connection whose events have just committed.

    The NOTIFY is sent after the appending transaction, not inside it: inside, it
    would hold PostgreSQL's global notify lock through that transaction's commit,
    and concurrent writers could no longer share a WAL flush. On its own it is a
    transaction that writes nothing, so it does not wait for a flush either.
    """
    try:
        if driver.autocommit:
            await driver.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
        else:
            # Autocommit for this one statement: no BEGIN and COMMIT round trips.
            await driver.set_autocommit(True)
            try:
                await driver.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
            finally:
                await driver.set_autocommit(False)
    except psycopg.Error as exc:
        # Only a hint: tailers poll, so a lost wake-up costs latency, nothing else.
        log.warning("could not notify tailers", extra={"error": str(exc)})


class NotificationListener:
    """LISTENs on one channel, on a connection of its own, for good.

    It reconnects whenever the connection drops. Subclasses say what a
    notification means, and what to do after each (re)connection, when
    notifications may have been missed meanwhile.
    """

    channel: str

    def __init__(
        self,
        dsn: str,
        *,
        reconnect_delay_s: float = 1.0,
        standby_retry_s: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._reconnect_delay_s = reconnect_delay_s
        self._standby_retry_s = standby_retry_s
        self._task: asyncio.Task[None] | None = None
        # True while the database is a hot standby, which sends no notifications.
        self.on_standby = False

    def _listen_in_background(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                self._listen(), name=f"listen-{self.channel}"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _connected(self) -> None:
        raise NotImplementedError

    def _notified(self, payload: str) -> None:
        raise NotImplementedError

    async def _listen(self) -> None:
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, **connect_options(5)
                )
                async with connection:
                    await connection.execute(f"LISTEN {self.channel}")
                    if self.on_standby:
                        log.info("listening: the database was promoted")
                        self.on_standby = False
                    self._connected()
                    async for notification in connection.notifies():
                        self._notified(notification.payload)
            except psycopg.errors.ReadOnlySqlTransaction:
                if not self.on_standby:
                    log.info(
                        "the database is a hot standby, which sends no"
                        " notifications: waiters poll instead",
                        extra={"channel": self.channel},
                    )
                    self.on_standby = True
                await asyncio.sleep(self._standby_retry_s)
            except psycopg.Error as exc:
                log.warning(
                    "listener disconnected, retrying",
                    extra={"channel": self.channel, "error": str(exc)},
                )
                await asyncio.sleep(self._reconnect_delay_s)


class LogListener(NotificationListener):
    """Wakes a tailer of the log when events may have committed."""

    channel = NOTIFY_CHANNEL

    def __init__(self, dsn: str, *, reconnect_delay_s: float = 1.0) -> None:
        super().__init__(dsn, reconnect_delay_s=reconnect_delay_s)
        self._woken = asyncio.Event()

    async def start(self) -> None:
        self._listen_in_background()

    async def wait(self, timeout_s: float) -> bool:
        """Wait for a new-events hint, at most `timeout_s` seconds; True if woken."""
        try:
            await asyncio.wait_for(self._woken.wait(), timeout_s)
        except TimeoutError:
            return False
        self._woken.clear()
        return True

    def _connected(self) -> None:
        # Events may have committed while nobody listened.
        self._woken.set()

    def _notified(self, payload: str) -> None:
        self._woken.set()
