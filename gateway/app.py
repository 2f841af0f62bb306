"""One ASGI app that routes by method to the command API or the query API."""

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.routing import compile_path
from starlette.types import Message, Receive, Scope, Send

from command_api.app import create_app as create_command_app
from query_api.app import create_app as create_query_app
from shared.db import name_sessions
from shared.logging import configure_logging
from shared.settings import get_settings

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The command API's own pages (its docs and schema), which are GETs.
COMMAND_PAGES = "/commands/"


class Gateway:
    def __init__(self, command_app: FastAPI, query_app: FastAPI) -> None:
        self.command_app = command_app
        self.query_app = query_app
        self._routes: list[tuple[re.Pattern[str], set[str]]] | None = None
        # The query API serves `/openapi.json` and `/docs` here, with both APIs'
        # paths: through its own middleware (request id, metrics, methods).
        self._query_schema = query_app.openapi
        query_app.openapi = self.openapi  # type: ignore[method-assign]

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for app in (self.command_app, self.query_app):
                await stack.enter_async_context(app.router.lifespan_context(app))
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._run_lifespan(receive, send)
            return
        method = scope.get("method", "GET")
        target = self.query_app if method in READ_METHODS else self.command_app
        if scope["type"] != "http":
            await target(scope, receive, send)
            return
        if scope["path"].startswith(COMMAND_PAGES):
            target = self.command_app
        await target(scope, receive, self._naming_allowed(scope, send))

    def _naming_allowed(self, scope: Scope, send: Send) -> Send:
        """`send`, but a routing miss on a path the other API takes becomes 405,
        or 204 for OPTIONS, naming the methods the path takes.

        Each API knows only its own methods: a GET on the command API's
        `/api/v1/token` would be the query API's 404. A 404 or 405 for a method
        that neither API takes on this path is answered as 405 with every method
        that both do; a 404 from a handler (for a method the path takes) stays.
        OPTIONS goes to an API like any request (so it has a request id and is
        counted), and its 405 becomes the 204 that lists the methods.
        """
        replaced = False

        async def checked_send(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in {
                404,
                405,
            }:
                allowed = self.allowed_methods(scope["path"])
                options = scope["method"] == "OPTIONS"
                if allowed and (options or scope["method"] not in allowed):
                    replaced = True
                    # Keep what the API's middleware set, the request id above all.
                    kept = {
                        name.decode("latin-1"): value.decode("latin-1")
                        for name, value in message.get("headers", [])
                        if name.lower() == b"x-request-id"
                    }
                    headers = {**kept, **_allow(allowed)}
                    answer = (
                        Response(status_code=204, headers=headers)
                        if options
                        else JSONResponse(
                            {"detail": "Method Not Allowed"}, 405, headers=headers
                        )
                    )
                    await answer(scope, _no_body, send)
                    return
            if not replaced:
                await send(message)

        return checked_send

    def allowed_methods(self, path: str) -> set[str]:
        """The methods either API takes on `path` (none if neither has it)."""
        if self._routes is None:
            self._routes = self._route_table()
        for pattern, methods in self._routes:
            if pattern.match(path):
                return methods
        return set()

    def _route_table(self) -> list[tuple[re.Pattern[str], set[str]]]:
        """Each path template of both APIs with its methods, literal ones first
        (`/users/me` before `/users/{user_id}`): the schema's routes, and the
        pages that are not in it (`/metrics`, the docs)."""
        methods_by_path: dict[str, set[str]] = {}
        for schema in (self._query_schema(), self.command_app.openapi()):
            for path, operations in schema.get("paths", {}).items():
                methods = methods_by_path.setdefault(path, set())
                methods.update(method.upper() for method in operations)
        # Pages outside the schemas (`/metrics`, the docs) are top-level routes.
        for app in (self.query_app, self.command_app):
            for route in app.routes:
                page = getattr(route, "path", None)
                page_methods = getattr(route, "methods", None)
                if page is not None and page_methods:
                    methods_by_path.setdefault(page, set()).update(page_methods)
        table = []
        for path in sorted(methods_by_path, key=lambda p: (p.count("{"), p)):
            methods = methods_by_path[path] | {"OPTIONS"}
            if "GET" in methods:
                methods.add("HEAD")
            pattern, _, _ = compile_path(path)
            table.append((pattern, methods))
        return table

    def openapi(self) -> dict[str, Any]:
        """The query API's schema with the command API's paths merged in."""
        schema = dict(self._query_schema())
        commands = self.command_app.openapi()
        paths = {path: dict(ops) for path, ops in schema.get("paths", {}).items()}
        for path, operations in commands.get("paths", {}).items():
            for method, operation in operations.items():
                if method.upper() not in READ_METHODS:
                    paths.setdefault(path, {})[method] = operation
        schema["paths"] = paths
        components = dict(schema.get("components", {}))
        for key, values in commands.get("components", {}).items():
            components[key] = {**values, **components.get(key, {})}
        schema["components"] = components
        return schema

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        await receive()
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                await receive()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})


def _allow(methods: set[str]) -> dict[str, str]:
    return {"Allow": ", ".join(sorted(methods))}


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def create_app() -> Gateway:
    settings = get_settings()
    configure_logging(settings)
    name_sessions("gateway")
    return Gateway(create_command_app(settings), create_query_app(settings))
