"""One ASGI app that routes by method to the command API or the query API."""

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from command_api.app import create_app as create_command_app
from query_api.app import create_app as create_query_app
from shared.logging import configure_logging
from shared.settings import get_settings

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Gateway:
    def __init__(self, command_app: FastAPI, query_app: FastAPI) -> None:
        self.command_app = command_app
        self.query_app = query_app

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
        if scope["type"] == "http" and scope["path"] == "/openapi.json":
            await JSONResponse(self.openapi())(scope, receive, send)
            return
        method = scope.get("method", "GET")
        target = self.query_app if method in READ_METHODS else self.command_app
        await target(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """The query API's schema with the command API's paths merged in."""
        schema = dict(self.query_app.openapi())
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


def create_app() -> Gateway:
    settings = get_settings()
    configure_logging(settings)
    return Gateway(create_command_app(settings), create_query_app(settings))
