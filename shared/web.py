"""HTTP plumbing both APIs share: request ids, body limits, errors, health."""

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import errors, pii
from shared.db import create_engine, is_unavailable
from shared.event_store import EventStore
from shared.health import Check, CheckResult, run_checks
from shared.inputs import MAX_DEPTH, json_text
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
        # Printable ASCII only: it goes back in a header and into the log, which
        # would carry other bytes garbled.
        usable = sent_id.isascii() and sent_id.isprintable()
        request_id = sent_id[:64] if usable else ""
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


class HeadAsGetMiddleware:
    """Answer HEAD as GET without the body (RFC 9110, section 9.3.2).

    FastAPI routes only the methods a route names, and every read route here is
    a GET; its headers (Content-Length, ETag) are what a HEAD must answer.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, send_without_body)
        finally:
            # What routing found, for the middleware outside (metrics by route).
            for key in ("route", "endpoint", "path_params"):
                if key in as_get:
                    scope[key] = as_get[key]


class BodySizeLimitMiddleware:
    """Answer 413 to a body over `max_bytes`, before any handler reads it.

    A body with a Content-Length is judged by it (the server holds the body to
    it). A streamed one (chunked, no length) is read here first, up to the limit:
    refused in the middle of a handler's read, it would surface as a parse error.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        size = 0
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return read.pop(0) if read else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body is larger than {self.max_bytes} bytes"},
            status_code=413,
        )
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def client_errors(found: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors as a client sees them: where, what and why.

    Never the value that was sent (`input`): it may be a password, or something
    JSON cannot carry (NaN, a lone surrogate), which would turn a 422 into a 500.
    Anything else an error holds is kept only if it has JSON text.
    """
    shown = []
    for error in found:
        item: dict[str, Any] = {
            "loc": [
                part if isinstance(part, int) else _text(part)
                for part in error.get("loc", ())
            ],
            "msg": _text(error.get("msg", "")),
            "type": _text(error.get("type", "value_error")),
        }
        for key, value in error.items():
            if key in item or key in ("input", "url"):
                continue
            if key == "ctx" and isinstance(value, Mapping):
                value = {k: v for k, v in value.items() if json_text(v) is not None}
                if not value:
                    continue
            if json_text(value) is not None:
                item[key] = value
        shown.append(item)
    return shown


def _text(value: object) -> str:
    return str(value).encode("utf-8", "replace").decode("utf-8")


def validation_error(loc: Sequence[str | int], message: str) -> HTTPException:
    """A 422 in the shape every validation error has: `detail` is a list."""
    return HTTPException(
        422, [{"loc": list(loc), "msg": message, "type": "value_error"}]
    )


def error_response(exc: errors.HelixError) -> JSONResponse:
    for error_type, status in _STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
            detail: Any = str(exc)
            if isinstance(exc, errors.ValidationFailed):
                detail = client_errors(
                    [{"loc": list(exc.loc), "msg": detail, "type": "value_error"}]
                )
            return JSONResponse({"detail": detail}, status, headers=headers)
    return JSONResponse({"detail": "internal error"}, 500)


# FastAPI answers 400 "There was an error parsing the body" when the JSON parser
# raises anything but a JSONDecodeError; its cause says what was wrong.
_UNREADABLE_BODIES: tuple[tuple[type[BaseException], str], ...] = (
    (UnicodeDecodeError, "the body is not valid UTF-8"),
    (RecursionError, f"the body nests deeper than {MAX_DEPTH} levels"),
    (ValueError, "a number in the body has more digits than can be read"),
)


def _unreadable_body(exc: StarletteHTTPException) -> str | None:
    """Why a body that is JSON to the letter could not be read, if that is
    what `exc` is: a 422 as for any other malformed body, not a 400."""
    if exc.status_code != 400 or exc.__cause__ is None:
        return None
    for kind, reason in _UNREADABLE_BODIES:
        if isinstance(exc.__cause__, kind):
            return reason
    return None


def _json_body_sent_as_another_type(
    request: Request, found: Sequence[Mapping[str, Any]]
) -> bool:
    """Whether a route that takes a JSON object got a body of another media type
    (FastAPI then sees no object at all, and would say only that)."""
    media_type = request.headers.get("content-type", "").partition(";")[0]
    media_type = media_type.strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return False
    return any(
        tuple(error.get("loc", ())) == ("body",)
        and error.get("type") == "model_attributes_type"
        for error in found
    )


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

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if _json_body_sent_as_another_type(request, exc.errors()):
            detail = "send the body as application/json"
            return JSONResponse({"detail": detail}, 415)
        return JSONResponse({"detail": client_errors(exc.errors())}, 422)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        unreadable = _unreadable_body(exc)
        if unreadable is not None:
            detail = [{"loc": ["body"], "msg": unreadable, "type": "json_invalid"}]
            return JSONResponse({"detail": detail}, 422)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(errors.HelixError, domain_error)
    app.add_exception_handler(Exception, unexpected_error)


# Health answers are reused this long: anyone may ask, as often as they like, and
# each look opens connections to RabbitMQ.
HEALTH_REUSE_S = 1.0


def add_health_route(
    app: FastAPI,
    checks: Callable[[Request], Mapping[str, Check]],
    timeout_s: float,
    reuse_s: float = HEALTH_REUSE_S,
) -> None:
    looked_at = -math.inf
    results: list[CheckResult] = []
    looking = asyncio.Lock()

    async def look(request: Request) -> list[CheckResult]:
        """The checks' results, at most `reuse_s` old: concurrent requests wait
        for one look instead of each making their own."""
        nonlocal looked_at, results
        async with looking:
            if time.monotonic() - looked_at >= reuse_s:
                results = await run_checks(checks(request), timeout_s)
                looked_at = time.monotonic()
            return results

    async def health(request: Request) -> JSONResponse:
        """Whether every dependency answers; 503 names the ones that do not."""
        results = await look(request)
        healthy = all(result.ok for result in results)
        body: dict[str, Any] = {
            "status": "ok" if healthy else "unavailable",
            "checks": {r.name: {"ok": r.ok, "detail": r.detail} for r in results},
        }
        if not healthy:
            failing = [r.name for r in results if not r.ok]
            log.warning("health check failing", extra={"failing": failing})
        return JSONResponse(body, 200 if healthy else 503)

    app.add_api_route(
        "/health/",
        health,
        methods=["GET"],
        tags=["health"],
        responses={503: {"description": "A dependency is down; `checks` names it"}},
    )


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


__all__ = [
    "BodySizeLimitMiddleware",
    "HeadAsGetMiddleware",
    "RequestContextMiddleware",
    "bind",
]
