"""`GET /metrics` speaks Prometheus text: requests by route, consumer lag."""

import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from command_api.app import create_app as create_command_app
from gateway.app import Gateway
from query_api.app import create_app as create_query_app
from shared.checkpoints import save_checkpoint
from shared.db import transaction
from shared.event_store import LOG_START, EventMetadata, EventStore
from tests.horizon import wait_until_readable
from tests.sample_events import ThingHappened, sample_events


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def test_metrics_count_requests_by_route_and_report_consumer_lag(
    settings, engine
):
    store = EventStore(engine, sample_events)
    for _ in range(3):
        appended = await store.append(
            f"thing-{uuid.uuid4()}",
            [ThingHappened(name="a")],
            expected_version=None,
            metadata=EventMetadata(source="tests"),
        )
    await wait_until_readable(store, appended.last_position)
    async with transaction(engine) as connection:
        await save_checkpoint(connection, "relay", LOG_START)

    gateway = Gateway(create_command_app(settings), create_query_app(settings))
    async with gateway.lifespan():
        transport = httpx.ASGITransport(app=gateway)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t"
        ) as client:
            for _ in range(2):
                # 503 here: no Celery worker consumes this test's job queue.
                assert (await client.get("/health/")).status_code == 503
            user = f"/api/v1/users/{uuid.uuid4()}"
            assert (await client.get(user)).status_code == 401
            assert (await client.head(user)).status_code == 401
            response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    requests = samples(response.text, "helix_http_requests_total")
    health = (("app", "query_api"), ("method", "GET"), ("route", "/health/"))
    assert requests[(*health, ("status", "503"))] >= 2
    by_template = (
        ("app", "query_api"),
        ("method", "GET"),
        ("route", "/api/v1/users/{user_id}"),
        ("status", "401"),
    )
    assert requests[by_template] >= 1
    head = (("app", "query_api"), ("method", "HEAD"), *by_template[2:])
    assert requests[head] >= 1
    lag = samples(response.text, "helix_consumer_lag_events")
    assert lag[(("consumer", "relay"),)] == 3
    # No transaction holds the log back meanwhile.
    assert samples(response.text, "helix_read_horizon_held_seconds")[()] < 5


async def test_metrics_are_served_while_postgres_is_down(settings):
    unreachable = settings.model_copy(
        update={
            "database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none",
            "database_connect_timeout_s": 1,
        }
    )
    app = create_query_app(unreachable)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t"
        ) as client:
            await client.get("/api/v1/audit")
            response = await client.get("/metrics")

    assert response.status_code == 200
    assert samples(response.text, "helix_metrics_refresh_failed")[()] == 1
    assert any(
        ("route", "/api/v1/audit") in labels
        for labels in samples(response.text, "helix_http_requests_total")
    )
