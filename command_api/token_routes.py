"""`POST /api/v1/token`: the OAuth2 password flow (RFC 6749, section 4.3)."""

import logging
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from command_api.dependencies import AppSettings, Hasher, Redis, Store
from command_api.throttle import SignInThrottle
from command_api.user_commands import (
    CommandContext,
    RefusalReason,
    SignInRefused,
    sign_in,
)
from command_api.user_routes import POSITION_HEADER
from shared.auth import UNAUTHORIZED_HEADERS, create_access_token
from shared.inputs import StoredText
from shared.responses import POSITION, documented
from shared.users import normalise_email

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["auth"])

# No stored password is longer; a longer one fails without costing a hash.
MAX_PASSWORD_CHARS = 128


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


@router.post(
    "/token",
    response_model=TokenOut,
    responses=documented(200, headers=(POSITION,), errors=(400, 401, 413, 429)),
)
async def issue_token(
    username: Annotated[StoredText, Form(max_length=320)],
    password: Annotated[str, Form(max_length=4096)],
    request: Request,
    response: Response,
    settings: AppSettings,
    store: Store,
    hasher: Hasher,
    redis: Redis,
    grant_type: Annotated[StoredText | None, Form(max_length=100)] = None,
) -> TokenOut | JSONResponse:
    """Exchange an email (as `username`) and password for a bearer token.

    `grant_type` may be left out; sent, it must be `password`, the one grant
    this endpoint implements.
    """
    if grant_type is not None and grant_type != "password":
        # RFC 6749, section 5.2: the error code, beside the usual `detail`.
        body = {
            "detail": "only the password grant is supported",
            "error": "unsupported_grant_type",
        }
        return JSONResponse(body, 400, headers={"Cache-Control": "no-store"})
    email = normalise_email(username)
    client_address = request.client.host if request.client else "unknown"
    throttle = SignInThrottle(redis, settings)
    retry_after = await throttle.attempt(email, client_address)
    if retry_after is not None:
        _log_refusal("throttled", client_address, retry_after_s=retry_after)
        raise HTTPException(
            429,
            "too many failed sign-ins; try again later",
            headers={"Retry-After": str(retry_after)},
        )

    context = CommandContext(correlation_id=getattr(request.state, "request_id", None))
    try:
        if len(password) > MAX_PASSWORD_CHARS:
            raise SignInRefused("password_too_long")
        user_id, position = await sign_in(
            store=store, hasher=hasher, email=email, password=password, context=context
        )
    except SignInRefused as exc:
        _log_refusal(exc.reason, client_address, user_id=exc.user_id)
        raise HTTPException(401, str(exc), headers=UNAUTHORIZED_HEADERS) from None
    await throttle.succeeded(email, client_address)

    issued = create_access_token(settings, user_id)
    response.headers[POSITION_HEADER] = str(position)
    response.headers["Cache-Control"] = "no-store"
    return TokenOut(access_token=issued.token, expires_in=issued.expires_in)


def _log_refusal(
    reason: RefusalReason | Literal["throttled"],
    client_address: str,
    *,
    user_id: UUID | None = None,
    retry_after_s: int | None = None,
) -> None:
    """One line per refused sign-in, for an operator looking for a guesser.

    The email is personal data and stays out: the user id names the account
    when there is one, and the client address is the one the throttle counts by.
    """
    fields: dict[str, object] = {"reason": reason, "client_address": client_address}
    if user_id is not None:
        fields["user_id"] = str(user_id)
    if retry_after_s is not None:
        fields["retry_after_s"] = retry_after_s
    log.warning("sign-in refused", extra=fields)
