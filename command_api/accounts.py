"""The user aggregate and the command-side rows that travel with its events.

The command API never reads a projection: a user's state is folded from its own
stream, and what the log must not hold (the password hash) or what a command must
check atomically with its append (email uniqueness, the ETag's version) lives in
command-side tables, locked for the length of the command's transaction.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from shared import pii
from shared.errors import Conflict
from shared.event_store import EventStore, RecordedEvent
from shared.events.user import REPRESENTATION_EVENTS
from shared.users import UserOut, user_stream


@dataclass
class UserState:
    """One user as its stream tells it, PII decrypted with the user's key."""

    id: UUID
    version: int = 0
    representation_version: int = 0
    last_position: int = 0
    email: str | None = None
    full_name: str | None = None
    is_active: bool = True
    is_superuser: bool = False
    deleted: bool = False
    erased: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def exists(self) -> bool:
        return self.version > 0

    def apply(self, event: RecordedEvent, key: bytes | None) -> None:
        data = pii.reveal(event.type, event.data, key)
        self.record(event.type, data, event.version, event.position, event.recorded_at)

    def record(
        self,
        event_type: str,
        data: dict[str, Any],
        version: int,
        position: int,
        recorded_at: datetime,
    ) -> None:
        """Apply one event whose personal fields are in clear."""
        self.version = version
        self.last_position = position
        if event_type == "UserRegistered":
            self.email = data["email"]
            self.full_name = data.get("full_name")
            self.is_superuser = data.get("is_superuser", False)
            self.created_at = recorded_at
        elif event_type == "UserProfileUpdated":
            self.full_name = data.get("full_name")
        elif event_type == "UserEmailChanged":
            self.email = data["email"]
        elif event_type == "UserRoleChanged":
            self.is_superuser = data["is_superuser"]
            self.is_active = data["is_active"]
            self.deleted = self.deleted and not self.is_active
        elif event_type == "UserDeleted":
            self.is_active = False
            self.deleted = True
            self.erased = self.erased or data.get("erased", False)
        if event_type in REPRESENTATION_EVENTS:
            self.representation_version = version
            self.updated_at = recorded_at

    def to_out(self) -> UserOut:
        assert self.created_at is not None and self.updated_at is not None
        return UserOut(
            id=self.id,
            email=pii.ERASED if self.erased else self.email or "",
            full_name=None if self.erased else self.full_name,
            is_active=self.is_active,
            is_superuser=self.is_superuser,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


@dataclass(frozen=True, slots=True)
class Credentials:
    user_id: UUID
    password_hash: str
    is_active: bool
    is_superuser: bool
    representation_version: int
    erased: bool


async def load_user(
    store: EventStore, connection: AsyncConnection, user_id: UUID
) -> UserState:
    """Fold the user's stream; call it with the credentials row locked."""
    state = UserState(id=user_id)
    key = await pii.load_key(connection, user_id)
    for event in await store.read_stream(user_stream(user_id)):
        state.apply(event, key)
    return state


def _credentials(row: Any) -> Credentials:
    return Credentials(
        user_id=row.user_id,
        password_hash=row.password_hash,
        is_active=row.is_active,
        is_superuser=row.is_superuser,
        representation_version=row.representation_version,
        erased=row.erased,
    )


_CREDENTIALS = """
SELECT user_id, password_hash, is_active, is_superuser, representation_version,
       erased_at IS NOT NULL AS erased
FROM user_credentials WHERE user_id = %(user_id)s
"""


async def lock_credentials(
    connection: AsyncConnection, user_id: UUID
) -> Credentials | None:
    """The account's row, locked until the transaction ends.

    Every append to a user stream takes this lock first, so the commands on one
    user run one after another and each sees the state the previous one left.
    """
    result = await connection.exec_driver_sql(
        _CREDENTIALS + " FOR UPDATE", {"user_id": user_id}
    )
    row = result.one_or_none()
    return None if row is None else _credentials(row)


async def lock_active_superusers(connection: AsyncConnection) -> list[UUID]:
    """The active superusers' ids, their rows locked until the transaction ends.

    Taken before any single account's lock by a command that may remove a
    superuser, and always in id order, so two such commands never deadlock and
    the second sees what the first left.
    """
    result = await connection.exec_driver_sql(
        "SELECT user_id FROM user_credentials WHERE is_superuser AND is_active"
        " ORDER BY user_id FOR UPDATE"
    )
    return [row[0] for row in result.all()]


async def find_credentials_by_email(
    connection: AsyncConnection, email: str
) -> Credentials | None:
    result = await connection.exec_driver_sql(
        "SELECT c.user_id, c.password_hash, c.is_active, c.is_superuser,"
        " c.representation_version, c.erased_at IS NOT NULL AS erased"
        " FROM user_email_reservations r JOIN user_credentials c USING (user_id)"
        " WHERE r.email = %(email)s",
        {"email": email},
    )
    row = result.one_or_none()
    return None if row is None else _credentials(row)


async def insert_credentials(
    connection: AsyncConnection,
    *,
    user_id: UUID,
    password_hash: str,
    is_superuser: bool,
    representation_version: int,
) -> None:
    await connection.exec_driver_sql(
        "INSERT INTO user_credentials"
        " (user_id, password_hash, is_superuser, representation_version)"
        " VALUES (%(user_id)s, %(hash)s, %(is_superuser)s, %(version)s)",
        {
            "user_id": user_id,
            "hash": password_hash,
            "is_superuser": is_superuser,
            "version": representation_version,
        },
    )


async def reserve_email(connection: AsyncConnection, email: str, user_id: UUID) -> None:
    """Reserve a normalised email for this user, or raise Conflict.

    ON CONFLICT waits for a concurrent transaction holding the same email to end,
    so of two racing registrations exactly one reserves it.
    """
    try:
        result = await connection.exec_driver_sql(
            "INSERT INTO user_email_reservations (email, user_id)"
            " VALUES (%(email)s, %(user_id)s)"
            " ON CONFLICT (email) DO NOTHING RETURNING email",
            {"email": email, "user_id": user_id},
        )
    except sa_exc.IntegrityError as exc:
        raise Conflict("this user already has an email reserved") from exc
    if result.one_or_none() is None:
        raise Conflict("a user with this email already exists")


async def release_email(connection: AsyncConnection, user_id: UUID) -> None:
    await connection.exec_driver_sql(
        "DELETE FROM user_email_reservations WHERE user_id = %(user_id)s",
        {"user_id": user_id},
    )


async def update_credentials(
    connection: AsyncConnection, user_id: UUID, **columns: Any
) -> None:
    """Set columns of the account row; `revoke_tokens` ends tokens issued so far."""
    assignments = ["updated_at = clock_timestamp()"]
    params: dict[str, Any] = {"user_id": user_id}
    if columns.pop("revoke_tokens", False):
        assignments.append("tokens_valid_after = clock_timestamp()")
    if columns.pop("erase", False):
        assignments.append("erased_at = clock_timestamp()")
    for name, value in columns.items():
        assert name in _UPDATABLE, name
        assignments.append(f"{name} = %({name})s")
        params[name] = value
    await connection.exec_driver_sql(
        f"UPDATE user_credentials SET {', '.join(assignments)}"
        " WHERE user_id = %(user_id)s",
        params,
    )


_UPDATABLE = frozenset(
    {"password_hash", "is_active", "is_superuser", "representation_version"}
)


async def transaction_time(connection: AsyncConnection) -> datetime:
    """`now()` of this transaction: the `recorded_at` of events it appends."""
    result = await connection.exec_driver_sql("SELECT now()")
    value: datetime = result.scalar_one()
    return value
