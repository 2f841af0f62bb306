"""Group commit: the appends that arrive together commit together.

Every commit waits for a WAL flush. Appends from many concurrent callers of one
process are therefore gathered while the previous batch is being written, and go
to PostgreSQL as one statement: one round trip and one flush for all of them.

Each append keeps its own outcome. The statement checks every append's expected
version and event ids on its own, inserts only the appends that pass, and reports
per append, so one conflicting append does not fail the others. Should the batch
hit a unique violation anyway (a writer in another process raced one of its
appends), or data the server refuses, each append is retried on its own, where
the error is reported to its caller alone.
"""

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import psycopg
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import connect, driver_connection

# A batch holds at most one append per stream (the second one's expected version
# depends on the first), and this many events in all.
MAX_BATCH_EVENTS = 2000

_APPEND_BATCH = """
WITH appends AS (
    SELECT * FROM unnest(%(stream_ids)s::text[], %(categories)s::text[],
                         %(expected_versions)s::int[], %(metadata)s::jsonb[])
        WITH ORDINALITY AS a(stream_id, category, expected_version, metadata, n)
), new AS (
    SELECT * FROM unnest(%(append_numbers)s::int[], %(event_ids)s::uuid[],
                         %(types)s::text[], %(schema_versions)s::int[],
                         %(data)s::jsonb[])
        WITH ORDINALITY AS e(n, event_id, type, schema_version, data, ord)
), checked AS (
    SELECT a.n, a.stream_id,
           (SELECT coalesce(max(version), 0) FROM events
             WHERE events.stream_id = a.stream_id) AS version,
           (SELECT json_agg(json_build_array(events.stream_id, events.version,
                                             events.position)
                            ORDER BY events.position)
              FROM events JOIN new ON new.event_id = events.event_id
             WHERE new.n = a.n) AS stored
    FROM appends a
), inserted AS (
    INSERT INTO events
        (stream_id, category, version, event_id, type, schema_version, data, metadata)
    SELECT a.stream_id, a.category,
           c.version + row_number() OVER (PARTITION BY a.n ORDER BY e.ord),
           e.event_id, e.type, e.schema_version, e.data, a.metadata
    FROM new e
    JOIN appends a ON a.n = e.n
    JOIN checked c ON c.n = e.n
    WHERE c.stored IS NULL
      AND (a.expected_version IS NULL OR a.expected_version = c.version)
    ORDER BY e.ord
    RETURNING stream_id, version, position
)
SELECT c.n, c.version, c.stored,
       (SELECT array_agg(i.position ORDER BY i.version) FROM inserted i
         WHERE i.stream_id = c.stream_id),
       now()
FROM checked c
ORDER BY c.n
"""

# What the statement reports of one append: the stream's version before it, the
# rows already stored under its event ids, the positions it was given, and the
# statement's start (the new events' recorded_at, as the statement commits).
Outcome = tuple[int, list[list[Any]] | None, list[int] | None, datetime]


R = TypeVar("R")


@dataclass
class _Append(Generic[R]):
    params: dict[str, Any]
    done: asyncio.Future[R] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GroupCommitter(Generic[R]):
    """Batches the concurrent appends of one event loop into shared commits.

    `single` commits one append by itself; `resolve` turns a batch's outcome for
    one append into its result (or raises its error); `after_commit` runs on the
    connection once a batch has committed.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        single: Callable[[dict[str, Any]], Awaitable[R]],
        resolve: Callable[[dict[str, Any], Outcome], R],
        after_commit: Callable[[psycopg.AsyncConnection], Awaitable[None]],
    ) -> None:
        self._engine = engine
        self._single = single
        self._resolve = resolve
        self._after_commit = after_commit
        # Futures and tasks belong to one event loop; a process may run several
        # in turn (a Celery worker), so each loop gets a queue of its own.
        self._queues: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _Queue[R]
        ] = weakref.WeakKeyDictionary()

    async def append(self, params: dict[str, Any]) -> Any:
        """Commit one append with whichever others are waiting; its result."""
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue(self)
        item: _Append[R] = _Append(params)
        queue.put(item)
        return await item.done


class _Queue(Generic[R]):
    def __init__(self, committer: GroupCommitter[R]) -> None:
        self.committer = committer
        self.pending: list[_Append[R]] = []
        self.writer: asyncio.Task[None] | None = None

    def put(self, item: _Append[R]) -> None:
        self.pending.append(item)
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self.pending:
            batch = self._take_batch()
            try:
                await self._commit(batch)
            except Exception as exc:
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)
            except BaseException:
                for item in [*batch, *self.pending]:
                    item.done.cancel()
                raise

    def _take_batch(self) -> list[_Append[R]]:
        batch: list[_Append[R]] = []
        rest: list[_Append[R]] = []
        streams: set[str] = set()
        events = 0
        for item in self.pending:
            size = len(item.params["event_ids"])
            stream = item.params["stream_id"]
            if stream in streams or (batch and events + size > MAX_BATCH_EVENTS):
                rest.append(item)
                continue
            batch.append(item)
            streams.add(stream)
            events += size
        self.pending = rest
        return batch

    async def _commit(self, batch: list[_Append[R]]) -> None:
        if len(batch) == 1:
            await self._alone(batch[0])
            return
        committer = self.committer
        try:
            async with connect(committer._engine) as connection:
                driver = await driver_connection(connection)
                await driver.set_autocommit(True)
                try:
                    cursor = await driver.execute(
                        _APPEND_BATCH, _batch_params(batch), prepare=False
                    )
                    rows = await cursor.fetchall()
                    await committer._after_commit(driver)
                finally:
                    await driver.set_autocommit(False)
        except (psycopg.IntegrityError, psycopg.DataError):
            # Nothing of the batch was stored, and the fault is one append's, not
            # the server's: let each append meet its error alone.
            await asyncio.gather(*(self._alone(item) for item in batch))
            return
        for item, (_, *outcome) in zip(batch, rows, strict=True):
            try:
                item.done.set_result(committer._resolve(item.params, tuple(outcome)))
            except Exception as exc:
                item.done.set_exception(exc)

    async def _alone(self, item: _Append[R]) -> None:
        try:
            item.done.set_result(await self.committer._single(item.params))
        except Exception as exc:
            item.done.set_exception(exc)


def _batch_params(batch: list[_Append[Any]]) -> dict[str, Any]:
    params: dict[str, list[Any]] = {
        key: []
        for key in (
            "stream_ids",
            "categories",
            "expected_versions",
            "metadata",
            "append_numbers",
            "event_ids",
            "types",
            "schema_versions",
            "data",
        )
    }
    for number, item in enumerate(batch, start=1):
        append = item.params
        params["stream_ids"].append(append["stream_id"])
        params["categories"].append(append["category"])
        params["expected_versions"].append(append["expected_version"])
        params["metadata"].append(append["metadata"])
        params["append_numbers"].extend([number] * len(append["event_ids"]))
        params["event_ids"].extend(append["event_ids"])
        params["types"].extend(append["types"])
        params["schema_versions"].extend(append["schema_versions"])
        params["data"].extend(append["data"])
    return params
