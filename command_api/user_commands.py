"""The user commands: register, update, delete, sign in.

Each runs validate, load, decide, append in one transaction that also writes the
command-side rows the events need, so a command either happens whole or not at
all. Passwords are hashed before the transaction opens: the hash takes tens of
milliseconds and must not hold the account's row lock meanwhile.
"""

import logging
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID, uuid4

from command_api.accounts import (
    UserState,
    find_credentials_by_email,
    insert_credentials,
    load_user,
    lock_active_superusers,
    lock_credentials,
    release_email,
    reserve_email,
    transaction_time,
    update_credentials,
)
from command_api.throttle import PasswordCheckThrottle
from shared import pii
from shared.auth import PasswordHasher, Principal
from shared.db import connect, transaction
from shared.errors import (
    Conflict,
    HelixError,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    ValidationFailed,
)
from shared.event_store import ANY_VERSION, NO_STREAM, EventMetadata, EventStore
from shared.events.registry import DomainEvent
from shared.events.user import (
    UserDeleted,
    UserEmailChanged,
    UserPasswordChanged,
    UserProfileUpdated,
    UserRegistered,
    UserRoleChanged,
    UserSignedIn,
    UserSignInFailed,
)
from shared.users import etag_matches, normalise_email, user_stream

log = logging.getLogger(__name__)


RefusalReason = Literal[
    "unknown_account", "wrong_password", "inactive", "password_too_long"
]


class SignInRefused(HelixError):
    """Wrong email, wrong password or an inactive account; callers cannot tell which.

    `reason` and `user_id` say it to the operator, in the log: never to the client.
    """

    def __init__(self, reason: RefusalReason, user_id: UUID | None = None) -> None:
        super().__init__("incorrect email or password")
        self.reason = reason
        self.user_id = user_id


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Who sent a command and under which request, for the events' metadata."""

    correlation_id: str | None
    actor_id: UUID | None = None
    source: str = "command_api"

    def metadata(self, actor_id: UUID | None = None) -> EventMetadata:
        return EventMetadata(
            source=self.source,
            actor_id=self.actor_id or actor_id,
            correlation_id=self.correlation_id,
        )


@dataclass(frozen=True, slots=True)
class UserResult:
    """The user after the command, and the log position a client may wait for."""

    user: UserState
    position: int


@dataclass(frozen=True, slots=True)
class UserChanges:
    """A PATCH: None means "leave it", except full_name, set when `full_name_set`."""

    email: str | None = None
    full_name: str | None = None
    full_name_set: bool = False
    password: str | None = None
    current_password: str | None = None
    is_active: bool | None = None
    is_superuser: bool | None = None


async def register_user(
    *,
    store: EventStore,
    hasher: PasswordHasher,
    email: str,
    password: str,
    full_name: str | None,
    is_superuser: bool,
    context: CommandContext,
) -> UserResult:
    email = normalise_email(email)
    password_hash = await hasher.hash(password)
    user_id = uuid4()

    async with transaction(store.engine) as connection:
        await insert_credentials(
            connection,
            user_id=user_id,
            password_hash=password_hash,
            is_superuser=is_superuser,
            representation_version=1,
        )
        await reserve_email(connection, email, user_id)
        key = await pii.create_key(connection, user_id)
        event = UserRegistered(
            email=pii.encrypt(key, email),
            full_name=pii.encrypt_optional(key, full_name),
            is_superuser=is_superuser,
        )
        result = await store.append(
            user_stream(user_id),
            [event],
            expected_version=NO_STREAM,
            metadata=context.metadata(actor_id=user_id),
            connection=connection,
        )
        recorded_at = await transaction_time(connection)

    state = UserState(id=user_id)
    clear = {"email": email, "full_name": full_name, "is_superuser": is_superuser}
    state.record(
        "UserRegistered", clear, result.version, result.last_position, recorded_at
    )
    log.info("user registered", extra={"user_id": str(user_id)})
    return UserResult(state, result.last_position)


async def update_user(
    *,
    store: EventStore,
    hasher: PasswordHasher,
    principal: Principal,
    user_id: UUID,
    changes: UserChanges,
    if_match: str | None,
    context: CommandContext,
    password_checks: PasswordCheckThrottle | None = None,
) -> UserResult:
    """Apply `changes`; a current_password they need counts as a guess in
    `password_checks` until it is found right."""
    _check_may_change(principal, user_id, changes)
    if principal.user_id == user_id and (changes.email or changes.password):
        await _check_current_password(store, hasher, user_id, changes, password_checks)
    new_hash = await hasher.hash(changes.password) if changes.password else None

    async with transaction(store.engine) as connection:
        superusers = (
            await lock_active_superusers(connection)
            if changes.is_superuser is False or changes.is_active is False
            else []
        )
        credentials = await lock_credentials(connection, user_id)
        if credentials is None:
            raise NotFound("user not found")
        if if_match is not None and not etag_matches(
            if_match, credentials.representation_version
        ):
            raise PreconditionFailed("the user changed since the ETag you sent")
        if credentials.erased:
            raise Conflict("this user was erased and cannot be changed")
        state = await load_user(store, connection, user_id)
        if state.deleted:
            # Deleted is for good: only erasure (DELETE ?erase=true) is left.
            raise Conflict("this user was deleted and cannot be changed")
        key = await pii.load_key(connection, user_id)
        assert key is not None, "only erased users lose their key"
        was_active = state.is_active

        decided: list[tuple[DomainEvent, dict[str, Any]]] = []
        if changes.email is not None:
            email = normalise_email(changes.email)
            if email != state.email:
                await release_email(connection, user_id)
                await reserve_email(connection, email, user_id)
                changed = UserEmailChanged(email=pii.encrypt(key, email))
                decided.append((changed, {"email": email}))
        if changes.full_name_set and changes.full_name != state.full_name:
            full_name = changes.full_name
            renamed = UserProfileUpdated(full_name=pii.encrypt_optional(key, full_name))
            decided.append((renamed, {"full_name": full_name}))
        if new_hash is not None:
            decided.append((UserPasswordChanged(), {}))
        standing = {
            "is_superuser": _given(changes.is_superuser, state.is_superuser),
            "is_active": _given(changes.is_active, state.is_active),
        }
        if standing != {"is_superuser": state.is_superuser, "is_active": was_active}:
            if not all(standing.values()):
                _keep_a_superuser(superusers, user_id)
            decided.append((UserRoleChanged(**standing), standing))
        if not decided:
            return UserResult(state, state.last_position)

        result = await store.append(
            user_stream(user_id),
            [event for event, _ in decided],
            expected_version=state.version,
            metadata=context.metadata(),
            connection=connection,
        )
        recorded_at = await transaction_time(connection)
        first_version = result.version - len(decided) + 1
        for offset, ((event, clear), position) in enumerate(
            zip(decided, result.positions, strict=True)
        ):
            version = first_version + offset
            state.record(event.event_type, clear, version, position, recorded_at)
        columns: dict[str, Any] = {
            "is_active": state.is_active,
            "is_superuser": state.is_superuser,
            "representation_version": state.representation_version,
        }
        if new_hash is not None:
            columns["password_hash"] = new_hash
        # A new password ends the sessions of whoever knew the old one.
        revoke = (was_active and not state.is_active) or new_hash is not None
        await update_credentials(connection, user_id, revoke_tokens=revoke, **columns)

    log.info("user updated", extra={"user_id": str(user_id), "events": len(decided)})
    return UserResult(state, result.last_position)


def _given(value: bool | None, current: bool) -> bool:
    return current if value is None else value


def _keep_a_superuser(superusers: list[UUID], user_id: UUID) -> None:
    """Refuse to remove the last active superuser: no one could manage users after."""
    if superusers == [user_id]:
        raise Conflict(
            "this is the last active superuser: make another superuser first"
        )


def _check_may_change(
    principal: Principal, user_id: UUID, changes: UserChanges
) -> None:
    # Someone else's account answers as if it did not exist.
    if not principal.may_act_on(user_id):
        raise NotFound("user not found")
    standing_changes = changes.is_active is not None or changes.is_superuser is not None
    if standing_changes and not principal.is_superuser:
        raise PermissionDenied("only a superuser may change is_active or is_superuser")


async def _check_current_password(
    store: EventStore,
    hasher: PasswordHasher,
    user_id: UUID,
    changes: UserChanges,
    checks: PasswordCheckThrottle | None,
) -> None:
    """Changing your own email or password needs the password you have now."""
    if changes.current_password is None:
        raise ValidationFailed(
            "current_password is required to change your own email or password",
            loc=("body", "current_password"),
        )
    async with connect(store.engine) as connection:
        result = await connection.exec_driver_sql(
            "SELECT password_hash FROM user_credentials WHERE user_id = %(user_id)s",
            {"user_id": user_id},
        )
        stored = result.scalar_one_or_none()
    if stored is None:
        raise NotFound("user not found")
    if checks is not None:
        await checks.attempt()
    ok, _ = await hasher.verify(changes.current_password, stored)
    if ok and checks is not None:
        await checks.passed()
    if not ok:
        log.warning("wrong current_password", extra={"user_id": str(user_id)})
        raise PermissionDenied("current_password is wrong")


async def delete_user(
    *,
    store: EventStore,
    principal: Principal,
    user_id: UUID,
    erase: bool,
    context: CommandContext,
) -> int:
    """Soft-delete the user (and with `erase`, destroy its key); the position."""
    if not principal.may_act_on(user_id):
        raise NotFound("user not found")

    async with transaction(store.engine) as connection:
        superusers = await lock_active_superusers(connection)
        credentials = await lock_credentials(connection, user_id)
        if credentials is None:
            raise NotFound("user not found")
        state = await load_user(store, connection, user_id)
        # Deleting again changes nothing, unless this time it also erases.
        if state.deleted and (state.erased or not erase):
            return state.last_position
        _keep_a_superuser(superusers, user_id)

        result = await store.append(
            user_stream(user_id),
            [UserDeleted(erased=erase)],
            expected_version=state.version,
            metadata=context.metadata(),
            connection=connection,
        )
        if erase:
            await pii.destroy_key(connection, user_id)
            await release_email(connection, user_id)
        await update_credentials(
            connection,
            user_id,
            is_active=False,
            representation_version=result.version,
            revoke_tokens=True,
            erase=erase,
        )

    log.info("user deleted", extra={"user_id": str(user_id), "erased": erase})
    return result.last_position


async def sign_in(
    *,
    store: EventStore,
    hasher: PasswordHasher,
    email: str,
    password: str,
    context: CommandContext,
) -> tuple[UUID, int]:
    """The user behind email and password, and the position of `UserSignedIn`.

    Raises SignInRefused. An unknown email is verified against a dummy hash, so
    it costs what a wrong password costs and timing does not reveal accounts.
    """
    async with connect(store.engine) as connection:
        credentials = await find_credentials_by_email(
            connection, normalise_email(email)
        )
    if credentials is None:
        await hasher.verify_unknown(password)
        raise SignInRefused("unknown_account")
    ok, new_hash = await hasher.verify(password, credentials.password_hash)
    user_id = credentials.user_id

    async with transaction(store.engine) as connection:
        # The lock orders this append after any command in flight on the user,
        # and the decision is made on the row as it is now: a password changed
        # or an account closed while this one was verified wins.
        locked = await lock_credentials(connection, user_id)
        if locked is None:
            raise SignInRefused("unknown_account")
        if ok and locked.password_hash != credentials.password_hash:
            # Changed meanwhile: by a password change (the password verified is
            # no longer the account's) or by another sign-in's rehash (it still
            # is). Only the stored hash can tell.
            ok, _ = await hasher.verify(password, locked.password_hash)
        if ok and locked.is_active:
            event: DomainEvent = UserSignedIn()
        else:
            event = UserSignInFailed(reason="inactive" if ok else "wrong_password")
        result = await store.append(
            user_stream(user_id),
            [event],
            expected_version=ANY_VERSION,
            metadata=context.metadata(actor_id=user_id),
            connection=connection,
        )
        if isinstance(event, UserSignedIn) and new_hash is not None:
            # Only if the password did not change while this one was verified.
            await connection.exec_driver_sql(
                "UPDATE user_credentials SET password_hash = %(new)s"
                " WHERE user_id = %(user_id)s AND password_hash = %(old)s",
                {"new": new_hash, "user_id": user_id, "old": credentials.password_hash},
            )

    if isinstance(event, UserSignInFailed):
        raise SignInRefused(event.reason, user_id)
    return user_id, result.last_position
