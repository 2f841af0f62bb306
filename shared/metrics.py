"""Prometheus metrics of an API process, served at `GET /metrics`."""

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "helix_http_requests_total",
    "HTTP requests answered, by route and status.",
    ["app", "method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "helix_http_request_duration_seconds",
    "Time to answer an HTTP request, by route.",
    ["app", "method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONSUMER_LAG_EVENTS = Gauge(
    "helix_consumer_lag_events",
    "Events in the log that a consumer (relay, projection) has yet to process.",
    ["consumer"],
)
CONSUMER_LAG_SECONDS = Gauge(
    "helix_consumer_lag_seconds",
    "Age of the oldest event a consumer has yet to process.",
    ["consumer"],
)
READ_HORIZON_SECONDS = Gauge(
    "helix_read_horizon_held_seconds",
    "How long the oldest writing transaction on the PostgreSQL server has been"
    " open: consumers of the log see nothing committed after it began.",
)
STANDBY_REPLAY_LAG_SECONDS = Gauge(
    "helix_standby_replay_lag_seconds",
    "How far the hot standby this process reads trails its primary (0 on a"
    " primary): reads, and the lag figures above, are that much older.",
)

REFRESH_FAILED = Gauge(
    "helix_metrics_refresh_failed",
    "1 when the figures read from PostgreSQL (lag, read horizon) could not be"
    " refreshed for this scrape and show their last values.",
)


class MetricsMiddleware:
    """Count and time every request, labelled by route template, not raw path."""

    def __init__(self, app: ASGIApp, app_name: str) -> None:
        self.app = app
        self.app_name = app_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            REQUESTS.labels(self.app_name, method, route, str(status)).inc()
            REQUEST_SECONDS.labels(self.app_name, method, route).observe(
                time.perf_counter() - started
            )


def add_metrics_route(
    app: FastAPI, refresh: Callable[[Request], Awaitable[None]] | None = None
) -> None:
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of this process.

        Served during an outage too, when they matter most: if the figures read
        from PostgreSQL cannot be refreshed, they keep their last values and
        helix_metrics_refresh_failed says so.
        """
        if refresh is not None:
            try:
                await refresh(request)
            except Exception as exc:
                REFRESH_FAILED.set(1)
                log.warning("metrics refresh failed", extra={"error": repr(exc)})
            else:
                REFRESH_FAILED.set(0)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        tags=["operations"],
        include_in_schema=False,
    )
