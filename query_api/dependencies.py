"""FastAPI dependencies of the query API, as `Annotated` aliases."""

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from query_api.consistency import consistent_read
from shared.auth import Principal, authenticate, bearer_scheme
from shared.event_store import EventStore
from shared.settings import Settings
from shared.web import state_engine, state_settings, state_store


async def _current_user(
    request: Request, token: Annotated[str | None, Depends(bearer_scheme)]
) -> Principal:
    return await authenticate(request, token)


async def _superuser(
    principal: Annotated[Principal, Depends(_current_user)],
) -> Principal:
    if not principal.is_superuser:
        raise HTTPException(403, "only a superuser may read this")
    return principal


AppSettings = Annotated[Settings, Depends(state_settings)]
Engine = Annotated[AsyncEngine, Depends(state_engine)]
Store = Annotated[EventStore, Depends(state_store)]
CurrentUser = Annotated[Principal, Depends(_current_user)]
Superuser = Annotated[Principal, Depends(_superuser)]
# Read-your-writes on the users projection: waits for a sent Helix-Position.
UsersFresh = Annotated[None, Depends(consistent_read("users"))]
# Read-your-writes on the log itself: the audit, read below the read horizon,
# and one stream's history, which shows an event once it is there.
LogFresh = Annotated[None, Depends(consistent_read())]
StreamFresh = Annotated[None, Depends(consistent_read(horizon=False))]
