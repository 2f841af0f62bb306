"""Authentication primitives: password hashing, access tokens, who is calling.

Passwords are hashed with argon2 through libpass's `CryptContext`. Hashing costs
tens of milliseconds of CPU on purpose, so it always runs in a worker thread, never
on the event loop. A stored hash made with older parameters verifies and comes back
re-hashed (`PasswordHasher.verify`), so raising the cost reaches every account at
its next sign-in.

Access tokens are JWTs signed with the settings' secret: `sub` (the user id), `exp`,
`iat`, `jti`, `iss` and `aud`. Decoding pins the one configured algorithm, so a
token that names `none` or another algorithm is refused before its signature is
looked at.

A token is only half of the answer: the APIs also check, on every request, that the
account is still active and that the token was issued after the account's
`tokens_valid_after` (see `load_principal`), so deleting or deactivating a user
ends the tokens already issued on both APIs at once.
"""

import asyncio
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from fastapi import HTTPException, Request
from fastapi.security import OAuth2PasswordBearer
from passlib.context import CryptContext
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import fetch
from shared.settings import Settings

log = logging.getLogger(__name__)

# OWASP's argon2id baseline is m=19 MiB, t=2; these are above it.
PRODUCTION_ARGON2 = {"memory_cost": 65536, "rounds": 3, "parallelism": 4}
# The test suite hashes hundreds of passwords; cost is not what it tests.
TEST_ARGON2 = {"memory_cost": 1024, "rounds": 1, "parallelism": 1}
REQUIRED_CLAIMS = ["sub", "exp", "iat", "jti", "iss", "aud"]


class InvalidToken(Exception):
    """The token is missing, malformed, expired, forged or for someone else."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The account a request acts as, as the credentials table has it now."""

    user_id: uuid.UUID
    is_superuser: bool

    def may_act_on(self, user_id: uuid.UUID) -> bool:
        return self.is_superuser or self.user_id == user_id


@dataclass(frozen=True, slots=True)
class AccessToken:
    token: str
    expires_in: int


class PasswordHasher:
    """argon2 hashing off the event loop, with upgrades of outdated hashes."""

    def __init__(self, argon2: dict[str, int] | None = None) -> None:
        params = argon2 or PRODUCTION_ARGON2
        self.context = CryptContext(
            schemes=["argon2"],
            deprecated="auto",
            argon2__type="ID",
            **{f"argon2__{name}": value for name, value in params.items()},
        )
        self._dummy_hash: str | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> "PasswordHasher":
        return cls(TEST_ARGON2 if settings.env == "test" else PRODUCTION_ARGON2)

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.context.hash, password)

    async def verify(self, password: str, stored_hash: str) -> tuple[bool, str | None]:
        """Whether `password` matches, and a new hash when the stored one is old."""
        ok, new_hash = await asyncio.to_thread(
            self.context.verify_and_update, password, stored_hash
        )
        return bool(ok), new_hash

    async def verify_unknown(self, password: str) -> None:
        """Spend what a real verification costs, so unknown emails do not show."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
        await self.verify(password, self._dummy_hash)


def create_access_token(
    settings: Settings, user_id: uuid.UUID, *, now: datetime | None = None
) -> AccessToken:
    issued_at = now or datetime.now(UTC)
    lifetime = timedelta(minutes=settings.access_token_minutes)
    claims = {
        "sub": str(user_id),
        # A fraction of a second, so a token issued just after a reactivation is
        # told apart from one issued just before the deactivation (RFC 7519
        # allows a non-integer NumericDate).
        "iat": issued_at.timestamp(),
        "exp": issued_at + lifetime,
        "jti": str(uuid.uuid4()),
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
    }
    token = jwt.encode(
        claims,
        settings.jwt_secret.get_secret_value(),
        algorithm=settings.jwt_algorithm,
    )
    return AccessToken(token, int(lifetime.total_seconds()))


def decode_access_token(settings: Settings, token: str) -> dict[str, Any]:
    """The verified claims of `token`; raises InvalidToken for any flaw."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.jwt_secret.get_secret_value(),
            algorithms=[settings.jwt_algorithm],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={"require": REQUIRED_CLAIMS},
        )
        uuid.UUID(str(claims["sub"]))
    except (jwt.PyJWTError, ValueError) as exc:
        raise InvalidToken(str(exc)) from exc
    return claims


# The credentials table is command-side state; the query API reads this one row
# by primary key too (documented in README), because a read model could lag a
# delete by a moment, and a deleted account's token must stop at once.
_ACCOUNT = """
SELECT is_active, is_superuser, tokens_valid_after
FROM user_credentials WHERE user_id = %(user_id)s
"""


async def load_principal(
    engine: AsyncEngine, settings: Settings, token: str
) -> Principal:
    """The caller behind `token`, if the token is valid and the account active."""
    claims = decode_access_token(settings, token)
    user_id = uuid.UUID(str(claims["sub"]))
    rows = await fetch(engine, _ACCOUNT, {"user_id": user_id})
    if not rows:
        raise InvalidToken("the account is not active")
    is_active, is_superuser, tokens_valid_after = rows[0]
    if not is_active:
        raise InvalidToken("the account is not active")
    issued_at = datetime.fromtimestamp(float(claims["iat"]), UTC)
    if tokens_valid_after is not None and issued_at <= tokens_valid_after:
        raise InvalidToken("the token was issued before the account was deactivated")
    return Principal(user_id=user_id, is_superuser=bool(is_superuser))


UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}
bearer_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/token", auto_error=False)


def not_authenticated(detail: str = "not authenticated") -> HTTPException:
    return HTTPException(401, detail, headers=UNAUTHORIZED_HEADERS)


async def authenticate(request: Request, token: str | None) -> Principal:
    """The FastAPI side of `load_principal`: any failure is a 401 asking for Bearer."""
    if not token:
        raise not_authenticated()
    state = request.app.state
    try:
        return await load_principal(state.engine, state.settings, token)
    except InvalidToken as exc:
        log.info("token refused", extra={"reason": str(exc)})
        raise not_authenticated("invalid or expired token") from None
