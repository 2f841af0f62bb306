"""The users read model: `user_profiles`, one row a user, as GET /users shows it.

Email and full name are stored as the events carry them, encrypted under the
user's key; the query API decrypts them when it answers. That keeps every handler
a pure function of the log (a rebuild writes the very same rows), and a user
erased later is erased here too, with no step to forget. `UserDeleted` with
`erased` also drops the ciphertext itself.

Each update applies only if the event is newer than the row's
`representation_version`, so a replayed event changes nothing.
"""

from typing import Any
from uuid import UUID

from projectors.framework import Projection, ProjectionTx
from shared.event_store import RecordedEvent

projection = Projection(
    name="users",
    tables={
        "user_profiles": (
            "id uuid PRIMARY KEY,"
            " email text,"
            " full_name text,"
            " is_active boolean NOT NULL,"
            " is_superuser boolean NOT NULL,"
            " erased boolean NOT NULL DEFAULT false,"
            " representation_version integer NOT NULL,"
            " created_at timestamptz NOT NULL,"
            " updated_at timestamptz NOT NULL"
        )
    },
    indexes={"user_profiles": ["created_at"]},
)


def _user_id(event: RecordedEvent) -> UUID:
    return UUID(event.stream_id.removeprefix("user-"))


async def _update(
    tx: ProjectionTx, event: RecordedEvent, assignments: str, values: dict[str, Any]
) -> None:
    await tx.connection.exec_driver_sql(
        f"UPDATE {tx.table('user_profiles')}"
        f" SET {assignments}, representation_version = %(version)s,"
        " updated_at = %(recorded_at)s"
        " WHERE id = %(id)s AND representation_version < %(version)s",
        {
            **values,
            "id": _user_id(event),
            "version": event.version,
            "recorded_at": event.recorded_at,
        },
    )


@projection.handles("UserRegistered")
async def add_user(tx: ProjectionTx, event: RecordedEvent) -> None:
    await tx.connection.exec_driver_sql(
        f"INSERT INTO {tx.table('user_profiles')}"
        " (id, email, full_name, is_active, is_superuser, representation_version,"
        "  created_at, updated_at)"
        " VALUES (%(id)s, %(email)s, %(full_name)s, true, %(is_superuser)s,"
        "  %(version)s, %(recorded_at)s, %(recorded_at)s)"
        " ON CONFLICT (id) DO NOTHING",
        {
            "id": _user_id(event),
            "email": event.data["email"],
            "full_name": event.data.get("full_name"),
            "is_superuser": event.data.get("is_superuser", False),
            "version": event.version,
            "recorded_at": event.recorded_at,
        },
    )


@projection.handles("UserProfileUpdated")
async def rename_user(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(
        tx, event, "full_name = %(full_name)s", {"full_name": event.data["full_name"]}
    )


@projection.handles("UserEmailChanged")
async def change_user_email(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(tx, event, "email = %(email)s", {"email": event.data["email"]})


@projection.handles("UserRoleChanged")
async def change_user_standing(tx: ProjectionTx, event: RecordedEvent) -> None:
    await _update(
        tx,
        event,
        "is_superuser = %(is_superuser)s, is_active = %(is_active)s",
        {
            "is_superuser": event.data["is_superuser"],
            "is_active": event.data["is_active"],
        },
    )


@projection.handles("UserDeleted")
async def deactivate_user(tx: ProjectionTx, event: RecordedEvent) -> None:
    if event.data.get("erased", False):
        assignments = "is_active = false, erased = true, email = NULL, full_name = NULL"
    else:
        assignments = "is_active = false"
    await _update(tx, event, assignments, {})
