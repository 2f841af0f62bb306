"""Tailing the audit by `next_after` sees every event once, whatever the commit order.

Two transactions append: A takes the lower transaction id, B inserts first (the
lower position) and commits last. A page taken between the two commits shows A's
event; the next page, after it, must still show B's.
"""

import uuid
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.event_store import EventStore
from shared.settings import Settings
from tests.horizon import wait_until_readable
from tests.user_api import bearer, superuser_token

_INSERT = (
    "INSERT INTO events (stream_id, category, version, event_id, type, data)"
    " VALUES (%s, 'thing', 1, %s, 'ThingHappened', %s::jsonb) RETURNING position"
)


def driver_dsn(settings: Settings) -> str:
    url = make_url(settings.database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def one(connection: psycopg.AsyncConnection[Any], sql: str, *args: Any) -> Any:
    row = await (await connection.execute(sql, args or None)).fetchone()
    assert row is not None
    return row[0]


async def insert(connection: psycopg.AsyncConnection[Any], name: str) -> int:
    stream, event_id = f"thing-{uuid.uuid4()}", uuid.uuid4()
    position: int = await one(
        connection, _INSERT, stream, event_id, f'{{"name": "{name}"}}'
    )
    return position


async def last_readable(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    """The position of the last event the audit shows now."""
    response = await client.get("/api/v1/audit?limit=500", headers=headers)
    items = response.json()["items"]
    assert response.status_code == 200 and len(items) < 500
    position: int = items[-1]["position"]
    return position


async def test_tailing_the_audit_sees_an_event_that_committed_late(
    client: httpx.AsyncClient,
    app_settings: Settings,
    engine: AsyncEngine,
) -> None:
    store = EventStore(engine)
    admin = bearer(await superuser_token(client, app_settings))
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql("SELECT max(position) FROM events")
        await wait_until_readable(store, result.scalar_one())
    after = await last_readable(client, admin)
    dsn = driver_dsn(app_settings)

    async with (
        await psycopg.AsyncConnection.connect(dsn) as a,
        await psycopg.AsyncConnection.connect(dsn) as b,
    ):
        xid_a = await one(a, "SELECT pg_current_xact_id()::text::bigint")
        position_b = await insert(b, "B")
        xid_b = await one(b, "SELECT pg_current_xact_id()::text::bigint")
        position_a = await insert(a, "A")
        await a.commit()
        assert xid_a < xid_b and position_b < position_a

        await wait_until_readable(store, position_a)
        first = await client.get(f"/api/v1/audit?after={after}&limit=1", headers=admin)
        await b.commit()

    await wait_until_readable(store, position_b)
    pages = [first.json()]
    while pages[-1]["next_after"] is not None:
        response = await client.get(
            f"/api/v1/audit?after={pages[-1]['next_after']}&limit=1", headers=admin
        )
        assert response.status_code == 200, response.text
        pages.append(response.json())

    seen = [item["position"] for page in pages for item in page["items"]]
    assert [item["position"] for item in pages[0]["items"]] == [position_a]
    assert seen == [position_a, position_b], "the tail missed or repeated an event"


async def test_audit_after_a_position_no_page_returned_is_422(
    client: httpx.AsyncClient, app_settings: Settings
) -> None:
    admin = bearer(await superuser_token(client, app_settings))
    unknown = await last_readable(client, admin) + 1_000_000

    response = await client.get(f"/api/v1/audit?after={unknown}", headers=admin)
    from_start = await client.get("/api/v1/audit?after=0", headers=admin)

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", "after"]
    assert "previous page" in error["msg"]
    assert from_start.status_code == 200
