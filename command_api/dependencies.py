"""FastAPI dependencies of the command API, as `Annotated` aliases."""

from typing import Annotated

import redis.asyncio as redis
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.auth import PasswordHasher, Principal, authenticate, bearer_scheme
from shared.event_store import EventStore
from shared.settings import Settings
from shared.web import state_engine, state_redis, state_settings, state_store


async def _hasher(request: Request) -> PasswordHasher:
    state = request.app.state
    if not hasattr(state, "password_hasher"):
        state.password_hasher = PasswordHasher.for_settings(state.settings)
    hasher: PasswordHasher = state.password_hasher
    return hasher


async def _current_user(
    request: Request, token: Annotated[str | None, Depends(bearer_scheme)]
) -> Principal:
    return await authenticate(request, token)


async def _optional_user(
    request: Request, token: Annotated[str | None, Depends(bearer_scheme)]
) -> Principal | None:
    """The caller if a token was sent (it must then be valid), else None."""
    if token is None:
        return None
    return await authenticate(request, token)


AppSettings = Annotated[Settings, Depends(state_settings)]
Engine = Annotated[AsyncEngine, Depends(state_engine)]
Store = Annotated[EventStore, Depends(state_store)]
Redis = Annotated[redis.Redis, Depends(state_redis)]
Hasher = Annotated[PasswordHasher, Depends(_hasher)]
CurrentUser = Annotated[Principal, Depends(_current_user)]
OptionalUser = Annotated[Principal | None, Depends(_optional_user)]
