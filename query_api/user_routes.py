"""User reads: the users projection (`user_profiles`), PII decrypted on the way out."""

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, HTTPException, Query, Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from query_api.dependencies import CurrentUser, Engine, Superuser, UsersFresh
from shared import pii
from shared.db import connect, snapshot
from shared.errors import NotFound
from shared.inputs import Offset
from shared.responses import ETAG, documented
from shared.users import UserOut, etag, etag_matches

router = APIRouter(prefix="/api/v1/users", tags=["users"])

MAX_PAGE = 500
_COLUMNS = (
    "id, email, full_name, is_active, is_superuser, erased, representation_version,"
    " created_at, updated_at"
)


class UserPage(BaseModel):
    items: list[UserOut]
    total: int


def _user_out(row: Any, key: bytes | None) -> UserOut:
    return UserOut(
        id=row.id,
        email=pii.decrypt(key, row.email) if key else pii.ERASED,
        full_name=pii.decrypt(key, row.full_name) if key else None,
        is_active=row.is_active,
        is_superuser=row.is_superuser,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def _present(connection: AsyncConnection, rows: list[Any]) -> list[UserOut]:
    """Decrypt each row's PII; a user whose key is gone shows as erased.

    The key goes in the delete's own transaction, so an erasure shows at once,
    even before the projection has applied `UserDeleted`.
    """
    keys = await pii.load_keys(connection, [row.id for row in rows if not row.erased])
    return [_user_out(row, keys.get(row.id)) for row in rows]


async def _one_user(
    engine: Engine, user_id: UUID, response: Response, if_none_match: str | None
) -> Any:
    async with connect(engine) as connection:
        result = await connection.exec_driver_sql(
            f"SELECT {_COLUMNS} FROM user_profiles WHERE id = %(id)s", {"id": user_id}
        )
        row = result.one_or_none()
        if row is None:
            raise NotFound("user not found")
        if if_none_match and etag_matches(
            if_none_match, row.representation_version, weak=True
        ):
            return Response(
                status_code=304, headers={"ETag": etag(row.representation_version)}
            )
        (user,) = await _present(connection, [row])
    response.headers["ETag"] = etag(row.representation_version)
    return user


IfNoneMatch = Annotated[str | None, Header(max_length=200)]


@router.get("/", response_model=UserPage, responses=documented(200, errors=(401, 403)))
async def list_users(
    engine: Engine,
    principal: Superuser,
    fresh: UsersFresh,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> UserPage:
    """Active users, oldest first (superuser)."""
    async with snapshot(engine) as connection:
        total = await connection.exec_driver_sql(
            "SELECT count(*) FROM user_profiles WHERE is_active"
        )
        result = await connection.exec_driver_sql(
            f"SELECT {_COLUMNS} FROM user_profiles WHERE is_active"
            " ORDER BY created_at, id OFFSET %(offset)s LIMIT %(limit)s",
            {"offset": offset, "limit": limit},
        )
        items = await _present(connection, list(result.all()))
        return UserPage(items=items, total=int(total.scalar_one()))


@router.get(
    "/me",
    response_model=UserOut,
    responses=documented(200, headers=(ETAG,), errors=(304, 401)),
)
async def read_me(
    engine: Engine,
    principal: CurrentUser,
    fresh: UsersFresh,
    response: Response,
    if_none_match: IfNoneMatch = None,
) -> Any:
    """The signed-in user."""
    return await _one_user(engine, principal.user_id, response, if_none_match)


@router.get(
    "/{user_id}",
    response_model=UserOut,
    responses=documented(200, headers=(ETAG,), errors=(304, 401, 404)),
)
async def read_user(
    user_id: UUID,
    engine: Engine,
    principal: CurrentUser,
    fresh: UsersFresh,
    response: Response,
    if_none_match: IfNoneMatch = None,
) -> Any:
    """One user (self or superuser); anyone else's answers 404."""
    if not principal.may_act_on(user_id):
        raise HTTPException(404, "user not found")
    return await _one_user(engine, user_id, response, if_none_match)
