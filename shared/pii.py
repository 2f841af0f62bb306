"""Personal data inside the log, encrypted under one key per user.

Events are immutable, so personal data cannot be deleted from the log; it is made
unreadable instead ("crypto-shredding"). Each user gets a random Fernet key (AES in
CBC mode with an HMAC) in the command-side table `user_keys`; the email and full
name inside that user's events are stored as `pii:<token>`. Erasing a user deletes
the key row, after which every reader, including a replay that rebuilds a read
model from the first event, shows those fields as `ERASED`.

Read tables keep the ciphertext as the events have it, and readers decrypt when
they answer, so projections stay pure functions of the log.

The users' keys are stored wrapped (encrypted) under the master keys of the
settings (`HELIX_PII_MASTER_KEYS`), so a copy of the database alone reveals no
personal data. The first master key wraps new keys; every one listed unwraps, so
a master key is rotated by putting the new one first, running `helix keys
rewrap` (`rewrap_all`), and then removing the old one. Keys stored before they
were wrapped are read as they are, and wrapped by a rewrap.
"""

from collections.abc import Iterable, Mapping
from typing import Any
from uuid import UUID

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import transaction
from shared.errors import KeyUnavailable
from shared.events.user import PII_FIELDS
from shared.settings import Settings, get_settings

PREFIX = "pii:"
ERASED = "[erased]"
# A Fernet key is 44 bytes of base64; wrapped, it is a token three times that.
UNWRAPPED_KEY_LENGTH = 44


_NO_MASTER_KEY = (
    "a user's key cannot be unwrapped: HELIX_PII_MASTER_KEYS lacks the master key"
    " it was wrapped with"
)


_master: MultiFernet | None = None


def use_master_keys(settings: Settings) -> None:
    """Wrap and unwrap users' keys with the master keys of `settings` from now
    on (an API process calls this when it starts; otherwise the process's
    settings from the environment apply)."""
    global _master
    _master = MultiFernet([Fernet(key) for key in settings.pii_master_key_list])


def _master_keys() -> MultiFernet:
    if _master is None:
        use_master_keys(get_settings())
    assert _master is not None
    return _master


def wrap(key: bytes) -> bytes:
    return _master_keys().encrypt(key)


def rewrap(stored: bytes) -> bytes:
    """`stored` wrapped under the first master key, whichever one wrapped it."""
    if len(stored) == UNWRAPPED_KEY_LENGTH:
        return wrap(stored)
    try:
        return _master_keys().rotate(stored)
    except InvalidToken:
        raise KeyUnavailable(_NO_MASTER_KEY) from None


def unwrap(stored: bytes) -> bytes:
    if len(stored) == UNWRAPPED_KEY_LENGTH:
        return stored
    try:
        return _master_keys().decrypt(stored)
    except InvalidToken:
        raise KeyUnavailable(_NO_MASTER_KEY) from None


def new_key() -> bytes:
    return Fernet.generate_key()


def encrypt(key: bytes, value: str) -> str:
    return PREFIX + Fernet(key).encrypt(value.encode()).decode()


def encrypt_optional(key: bytes, value: str | None) -> str | None:
    return None if value is None else encrypt(key, value)


def decrypt(key: bytes | None, value: str | None) -> str | None:
    """The clear text of `value`, or ERASED once its key is gone."""
    if value is None or not value.startswith(PREFIX):
        return value
    if key is None:
        return ERASED
    try:
        return Fernet(key).decrypt(value[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        return ERASED


def reveal(
    event_type: str, data: Mapping[str, Any], key: bytes | None
) -> dict[str, Any]:
    """Event data with its personal fields decrypted (or ERASED)."""
    revealed = dict(data)
    for field in PII_FIELDS.get(event_type, ()):
        if field in revealed:
            revealed[field] = decrypt(key, revealed[field])
    return revealed


async def create_key(connection: AsyncConnection, user_id: UUID) -> bytes:
    key = new_key()
    await connection.exec_driver_sql(
        "INSERT INTO user_keys (user_id, key) VALUES (%(user_id)s, %(key)s)",
        {"user_id": user_id, "key": wrap(key)},
    )
    return key


async def destroy_key(connection: AsyncConnection, user_id: UUID) -> None:
    await connection.exec_driver_sql(
        "DELETE FROM user_keys WHERE user_id = %(user_id)s", {"user_id": user_id}
    )


async def load_keys(
    connection: AsyncConnection, user_ids: Iterable[UUID]
) -> dict[UUID, bytes]:
    """The keys of those users that still have one."""
    wanted = list(set(user_ids))
    if not wanted:
        return {}
    result = await connection.exec_driver_sql(
        "SELECT user_id, key FROM user_keys WHERE user_id = ANY(%(ids)s)",
        {"ids": wanted},
    )
    return {row.user_id: unwrap(bytes(row.key)) for row in result}


async def load_key(connection: AsyncConnection, user_id: UUID) -> bytes | None:
    return (await load_keys(connection, [user_id])).get(user_id)


async def rewrap_all(engine: AsyncEngine, batch_size: int = 500) -> int:
    """Wrap every stored key under the first master key; how many were rewritten.

    Run after putting a new master key first in HELIX_PII_MASTER_KEYS; once it is
    done, the older master keys can be removed. Each batch commits on its own,
    so an interrupted run is simply run again.
    """
    done, after = 0, None
    while True:
        async with transaction(engine) as connection:
            result = await connection.exec_driver_sql(
                "SELECT user_id, key FROM user_keys"
                " WHERE %(after)s::uuid IS NULL OR user_id > %(after)s::uuid"
                " ORDER BY user_id LIMIT %(limit)s FOR UPDATE",
                {"after": after, "limit": batch_size},
            )
            rows = list(result)
            for row in rows:
                await connection.exec_driver_sql(
                    "UPDATE user_keys SET key = %(key)s WHERE user_id = %(user_id)s",
                    {"key": rewrap(bytes(row.key)), "user_id": row.user_id},
                )
        done += len(rows)
        if len(rows) < batch_size:
            return done
        after = rows[-1].user_id
