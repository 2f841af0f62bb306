"""The query API: reads projections and the log, never appends."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from query_api import history_routes, job_routes, user_routes
from query_api.job_waits import JobWaits
from shared.checkpoints import horizon_holder, lag_check, lags, replay_lag
from shared.db import name_sessions
from shared.health import Check, postgres_check, rabbitmq_check, redis_check
from shared.jobs.messaging import worker_check
from shared.logging import configure_logging
from shared.metrics import (
    CONSUMER_LAG_EVENTS,
    CONSUMER_LAG_SECONDS,
    READ_HORIZON_SECONDS,
    STANDBY_REPLAY_LAG_SECONDS,
    MetricsMiddleware,
    add_metrics_route,
)
from shared.settings import Settings, get_settings
from shared.web import (
    HeadAsGetMiddleware,
    RequestContextMiddleware,
    add_health_route,
    install_error_handlers,
    service_resources,
)


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:
        # Called bare, as `uvicorn --factory` does, this is the process's start.
        settings = get_settings()
        configure_logging(settings)
        name_sessions("query-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service_resources(app, settings):
            app.state.job_waits = JobWaits(settings.psycopg_dsn)
            try:
                yield
            finally:
                await app.state.job_waits.stop()

    app = FastAPI(title="HelixNet Core", version="1", lifespan=lifespan)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(MetricsMiddleware, app_name="query_api")
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    add_health_route(app, _checks, settings.health_check_timeout_s)
    add_metrics_route(app, _refresh_lag)
    app.include_router(user_routes.router)
    app.include_router(history_routes.router)
    app.include_router(job_routes.router)
    return app


async def _refresh_lag(request: Request) -> None:
    engine = request.app.state.engine
    for lag in await lags(engine):
        CONSUMER_LAG_EVENTS.labels(lag.name).set(lag.events)
        CONSUMER_LAG_SECONDS.labels(lag.name).set(lag.seconds)
    holder = await horizon_holder(engine)
    READ_HORIZON_SECONDS.set(holder.open_s if holder else 0.0)
    STANDBY_REPLAY_LAG_SECONDS.set(await replay_lag(engine) or 0.0)


def _checks(request: Request) -> dict[str, Check]:
    state = request.app.state
    return {
        "postgres": postgres_check(state.engine),
        "rabbitmq": rabbitmq_check(state.settings),
        "redis": redis_check(state.redis),
        "projections": lag_check(state.engine),
        "worker": worker_check(state.settings),
    }
