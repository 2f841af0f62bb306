"""The command API: every route that changes state appends events, nothing else."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from command_api import job_routes, token_routes, user_routes
from command_api.job_commands import sweep_idempotency_keys_every
from shared.db import name_sessions
from shared.health import Check, postgres_check, redis_check
from shared.logging import configure_logging
from shared.metrics import MetricsMiddleware, add_metrics_route
from shared.settings import Settings, get_settings
from shared.web import (
    BodySizeLimitMiddleware,
    HeadAsGetMiddleware,
    RequestContextMiddleware,
    add_health_route,
    install_error_handlers,
    service_resources,
)

MAX_BODY_BYTES = 1024 * 1024
KEY_SWEEP_INTERVAL_S = 3600.0


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:
        # Called bare, as `uvicorn --factory` does, this is the process's start.
        settings = get_settings()
        configure_logging(settings)
        name_sessions("command-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service_resources(app, settings):
            sweeping = asyncio.create_task(
                sweep_idempotency_keys_every(app.state.engine, KEY_SWEEP_INTERVAL_S),
                name="idempotency-key-sweep",
            )
            try:
                yield
            finally:
                sweeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeping

    app = FastAPI(
        title="HelixNet Core commands",
        version="1",
        lifespan=lifespan,
        docs_url="/commands/docs",
        openapi_url="/commands/openapi.json",
    )
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(MetricsMiddleware, app_name="command_api")
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    add_health_route(app, _checks, settings.health_check_timeout_s)
    add_metrics_route(app)
    app.include_router(token_routes.router)
    app.include_router(user_routes.router)
    app.include_router(job_routes.router)
    return app


def _checks(request: Request) -> dict[str, Check]:
    state = request.app.state
    return {
        "postgres": postgres_check(state.engine),
        "redis": redis_check(state.redis),
    }
