"""The users read model: `user_profiles`, one row a user, as GET /users shows it.

Email and full name are stored as the events carry them, encrypted under the
user's key; the query API decrypts them when it answers. That keeps every handler
a pure function of the log (a rebuild writes the very same rows), and a user
erased later is erased here too, with no step to forget. `UserDeleted` with
`erased` also drops the ciphertext itself.

A batch is applied at once: the rows of its users are read, its events folded
onto them in log order, and the changed rows written back in one statement. An
event applies only if it is newer than the row's `representation_version`, so a
replayed event changes nothing.
"""

from collections.abc import Sequence

from projectors.framework import (
    Projection,
    ProjectionTx,
    Row,
    entity_id,
    fold_onto_rows,
    rows_json,
)
from shared.db import driver_connection
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


COLUMNS = (
    "id",
    "email",
    "full_name",
    "is_active",
    "is_superuser",
    "erased",
    "representation_version",
    "created_at",
    "updated_at",
)


def registered_row(event: RecordedEvent) -> Row:
    data = event.data
    return {
        "id": entity_id(event),
        "email": data["email"],
        "full_name": data.get("full_name"),
        "is_active": True,
        "is_superuser": data.get("is_superuser", False),
        "erased": False,
        "representation_version": event.version,
        "created_at": event.recorded_at,
        "updated_at": event.recorded_at,
    }


def next_row(row: Row, event: RecordedEvent) -> Row:
    """The row after `event`, which is newer than the row (a pure function)."""
    return {
        **row,
        **changes(event),
        "representation_version": event.version,
        "updated_at": event.recorded_at,
    }


def changes(event: RecordedEvent) -> Row:
    """What an event after UserRegistered changes in the user's row."""
    data = event.data
    match event.type:
        case "UserProfileUpdated":
            return {"full_name": data["full_name"]}
        case "UserEmailChanged":
            return {"email": data["email"]}
        case "UserRoleChanged":
            return {
                "is_superuser": data["is_superuser"],
                "is_active": data["is_active"],
            }
        case "UserDeleted" if data.get("erased", False):
            return {
                "is_active": False,
                "erased": True,
                "email": None,
                "full_name": None,
            }
        case "UserDeleted":
            return {"is_active": False}
    return {}


@projection.handles_batch(
    "UserRegistered",
    "UserProfileUpdated",
    "UserEmailChanged",
    "UserRoleChanged",
    "UserDeleted",
)
async def apply_user_events(tx: ProjectionTx, events: Sequence[RecordedEvent]) -> None:
    """Fold a batch onto the rows of its users, then write the changed ones."""
    user_ids = list(dict.fromkeys(entity_id(event) for event in events))
    rows = await tx.rows_by_id("user_profiles", COLUMNS, user_ids)
    changed = fold_onto_rows(
        rows,
        events,
        row_id=entity_id,
        created_by="UserRegistered",
        new_row=registered_row,
        next_row=next_row,
        version="representation_version",
    )
    if changed:
        driver = await driver_connection(tx.connection)
        await driver.execute(
            tx.upsert_sql("user_profiles", COLUMNS),
            (rows_json(list(changed.values())),),
        )
