"""Events of the user stream (`user-<uuid>`).

`email` and `full_name` are personal data: events carry them encrypted under the
user's own key (`shared.pii`), never in clear, so destroying the key erases them
from the immutable log. Password hashes never enter an event at all.
"""

from typing import Literal

from shared.events.registry import DomainEvent, event


@event("UserRegistered")
class UserRegistered(DomainEvent):
    email: str
    full_name: str | None = None
    is_superuser: bool = False


@event("UserProfileUpdated")
class UserProfileUpdated(DomainEvent):
    full_name: str | None


@event("UserEmailChanged")
class UserEmailChanged(DomainEvent):
    email: str


@event("UserPasswordChanged")
class UserPasswordChanged(DomainEvent):
    """The password changed; what it became lives only in the credentials table."""


@event("UserRoleChanged")
class UserRoleChanged(DomainEvent):
    """A superuser changed the account's standing: its role or whether it is active."""

    is_superuser: bool
    is_active: bool


@event("UserSignedIn")
class UserSignedIn(DomainEvent):
    pass


@event("UserSignInFailed")
class UserSignInFailed(DomainEvent):
    reason: Literal["wrong_password", "inactive"]


@event("UserDeleted")
class UserDeleted(DomainEvent):
    """A soft delete; `erased` says the user's key was destroyed with it."""

    erased: bool = False


# What GET /users/{id} shows changes only with these; their stream version is the
# user's ETag, so a sign-in does not change it.
REPRESENTATION_EVENTS = frozenset(
    {
        "UserRegistered",
        "UserProfileUpdated",
        "UserEmailChanged",
        "UserRoleChanged",
        "UserDeleted",
    }
)
# Fields that hold ciphertext under the user's key, by event type.
PII_FIELDS: dict[str, tuple[str, ...]] = {
    "UserRegistered": ("email", "full_name"),
    "UserProfileUpdated": ("full_name",),
    "UserEmailChanged": ("email",),
}
