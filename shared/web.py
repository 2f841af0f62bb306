"""HTTP plumbing both APIs share: request ids, body limits, errors, health."""

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import errors, pii
from shared.db import create_engine, is_unavailable
from shared.event_store import EventStore
from shared.health import Check, run_checks
from shared.logging import bind, log_context
from shared.settings import Settings

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
RETRY_AFTER_S = 5

_STATUS_BY_ERROR: list[tuple[type[errors.HelixError], int]] = [
    (errors.ValidationFailed, 422),
    (errors.NotFound, 404),
    (errors.PermissionDenied, 403),
    (errors.Conflict, 409),
    (errors.Unavailable, 503),
]


class RequestContextMiddleware:
    """Give every request an id, bind it to the log, and log one line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        sent_id = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = sent_id[:64] if sent_id.isprintable() and sent_id else ""
        request_id = request_id or str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        token = log_context.set({"request_id": request_id})
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
            log_context.reset(token)


class BodySizeLimitMiddleware:
    """Answer 413 to a body over `max_bytes`, before any handler reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self.max_bytes
        ):
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body is larger than {self.max_bytes} bytes"},
            status_code=413,
        )
        await response({"type": "http"}, _no_receive, send)


class _BodyTooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def error_response(exc: errors.HelixError) -> JSONResponse:
    for error_type, status in _STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
            return JSONResponse({"detail": str(exc)}, status, headers=headers)
    return JSONResponse({"detail": "internal error"}, 500)


def install_error_handlers(app: FastAPI) -> None:
    """Domain errors become HTTP answers; anything unexpected is a logged 500."""

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.HelixError)
        response = error_response(exc)
        if response.status_code == 500:
            # A misconfiguration: the client can do nothing, an operator must.
            log.error("cannot serve the request", exc_info=exc)
        return response

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        if is_unavailable(exc):
            return error_response(errors.StoreUnavailable("PostgreSQL is unavailable"))
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse({"detail": "internal error"}, 500)

    app.add_exception_handler(errors.HelixError, domain_error)
    app.add_exception_handler(Exception, unexpected_error)


def add_health_route(
    app: FastAPI, checks: Callable[[Request], Mapping[str, Check]], timeout_s: float
) -> None:
    async def health(request: Request) -> JSONResponse:
        """Whether every dependency answers; 503 names the ones that do not."""
        results = await run_checks(checks(request), timeout_s)
        healthy = all(result.ok for result in results)
        body: dict[str, Any] = {
            "status": "ok" if healthy else "unavailable",
            "checks": {r.name: {"ok": r.ok, "detail": r.detail} for r in results},
        }
        if not healthy:
            failing = [r.name for r in results if not r.ok]
            log.warning("health check failing", extra={"failing": failing})
        return JSONResponse(body, 200 if healthy else 503)

    app.add_api_route("/health/", health, methods=["GET"], tags=["health"])


# These are coroutines on purpose: FastAPI runs a plain `def` dependency in its
# thread pool, a thread hop per dependency per request for an attribute read.
async def state_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def state_engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


async def state_store(request: Request) -> EventStore:
    store: EventStore = request.app.state.store
    return store


async def state_redis(request: Request) -> redis.Redis:
    client: redis.Redis = request.app.state.redis
    return client


@asynccontextmanager
async def service_resources(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """Open what every API process holds for its lifetime, on `app.state`.

    The `state_*` functions above read them back, as FastAPI dependencies.
    """
    pii.use_master_keys(settings)
    engine = create_engine(settings)
    app.state.settings = settings
    app.state.engine = engine
    app.state.store = EventStore(engine)
    app.state.redis = redis.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=2
    )
    try:
        yield
    finally:
        await app.state.redis.aclose()
        await engine.dispose()


__all__ = ["BodySizeLimitMiddleware", "RequestContextMiddleware", "bind"]
