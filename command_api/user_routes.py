"""User commands over HTTP: register, update, delete."""

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from pydantic import ConfigDict, EmailStr, Field, StringConstraints, model_validator

from command_api.dependencies import (
    AppSettings,
    CurrentUser,
    Hasher,
    OptionalUser,
    Redis,
    Store,
)
from command_api.throttle import PasswordCheckThrottle, SignInThrottle
from command_api.user_commands import (
    CommandContext,
    UserChanges,
    UserResult,
    delete_user,
    register_user,
    update_user,
)
from shared.errors import PermissionDenied, PreconditionFailed, Throttled
from shared.inputs import RequestBody
from shared.responses import ETAG, LOCATION, POSITION, documented
from shared.users import UserOut, etag

POSITION_HEADER = "Helix-Position"

router = APIRouter(prefix="/api/v1/users", tags=["users"])

# A password is kept exactly as sent: spaces at either end are part of it.
Password = Annotated[str, Field(min_length=8, max_length=128)]
FullName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
]


class UserCreate(RequestBody):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr = Field(max_length=254)
    password: Password
    full_name: FullName | None = None
    is_superuser: bool = False


class UserUpdate(RequestBody):
    """Only the fields sent change; `full_name: null` clears the name."""

    model_config = ConfigDict(extra="forbid")

    email: EmailStr | None = Field(default=None, max_length=254)
    full_name: FullName | None = None
    password: Password | None = None
    current_password: str | None = Field(default=None, max_length=128)
    is_active: bool | None = None
    is_superuser: bool | None = None

    @model_validator(mode="after")
    def refuse_nulls(self) -> "UserUpdate":
        for name in ("email", "password", "is_active", "is_superuser"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


def context_of(request: Request, actor_id: UUID | None) -> CommandContext:
    return CommandContext(
        correlation_id=getattr(request.state, "request_id", None), actor_id=actor_id
    )


def answer_with(response: Response, result: UserResult) -> UserOut:
    response.headers[POSITION_HEADER] = str(result.position)
    response.headers["ETag"] = etag(result.user.representation_version)
    return result.user.to_out()


@router.post(
    "/",
    status_code=201,
    response_model=UserOut,
    responses=documented(
        201, headers=(LOCATION, POSITION, ETAG), errors=(401, 403, 409, 413, 415)
    ),
)
async def create_user(
    body: UserCreate,
    request: Request,
    response: Response,
    store: Store,
    hasher: Hasher,
    principal: OptionalUser,
) -> Any:
    """Register a user; only a superuser may create a superuser."""
    if body.is_superuser and not (principal and principal.is_superuser):
        raise PermissionDenied("only a superuser may create a superuser")
    result = await register_user(
        store=store,
        hasher=hasher,
        email=body.email,
        password=body.password,
        full_name=body.full_name,
        is_superuser=body.is_superuser,
        context=context_of(request, principal.user_id if principal else None),
    )
    response.headers["Location"] = f"/api/v1/users/{result.user.id}"
    return answer_with(response, result)


@router.patch(
    "/{user_id}",
    response_model=UserOut,
    responses=documented(
        200, headers=(POSITION, ETAG), errors=(401, 403, 404, 409, 412, 413, 415, 429)
    ),
)
async def patch_user(
    user_id: UUID,
    body: UserUpdate,
    request: Request,
    response: Response,
    store: Store,
    hasher: Hasher,
    principal: CurrentUser,
    settings: AppSettings,
    redis: Redis,
    if_match: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    """Update a user (self or superuser); send If-Match to refuse lost updates."""
    changes = UserChanges(
        email=body.email,
        full_name=body.full_name,
        full_name_set="full_name" in body.model_fields_set,
        password=body.password,
        current_password=body.current_password,
        is_active=body.is_active,
        is_superuser=body.is_superuser,
    )
    try:
        result = await update_user(
            store=store,
            hasher=hasher,
            principal=principal,
            user_id=user_id,
            changes=changes,
            if_match=if_match,
            context=context_of(request, principal.user_id),
            password_checks=PasswordCheckThrottle(
                SignInThrottle(redis, settings), user_id
            ),
        )
    except PreconditionFailed as exc:
        raise HTTPException(412, str(exc)) from None
    except Throttled as exc:
        raise HTTPException(
            429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from None
    return answer_with(response, result)


@router.delete(
    "/{user_id}",
    status_code=204,
    response_class=Response,
    responses=documented(204, headers=(POSITION,), errors=(401, 403, 404, 409)),
)
async def remove_user(
    user_id: UUID,
    request: Request,
    store: Store,
    principal: CurrentUser,
    erase: Annotated[bool, Query()] = False,
) -> Response:
    """Soft-delete a user (self or superuser); `erase=true` also erases its PII."""
    position = await delete_user(
        store=store,
        principal=principal,
        user_id=user_id,
        erase=erase,
        context=context_of(request, principal.user_id),
    )
    return Response(status_code=204, headers={POSITION_HEADER: str(position)})
