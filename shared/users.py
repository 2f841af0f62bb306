"""What both APIs say about a user: its JSON shape, its ETag, its email's form."""

import contextlib
from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict
from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError

USER_STREAM_PREFIX = "user-"


class UserOut(BaseModel):
    """A user as every route shows it; never a password or a hash."""

    model_config = ConfigDict(extra="forbid")

    id: UUID
    email: str
    full_name: str | None
    is_active: bool
    is_superuser: bool
    created_at: datetime
    updated_at: datetime


def user_stream(user_id: UUID) -> str:
    return f"{USER_STREAM_PREFIX}{user_id}"


def user_id_of(stream_id: str) -> UUID | None:
    if not stream_id.startswith(USER_STREAM_PREFIX):
        return None
    try:
        return UUID(stream_id[len(USER_STREAM_PREFIX) :])
    except ValueError:
        return None


def normalise_email(email: str) -> str:
    """The one form an address is stored and compared in.

    The form registration gives it (pydantic's EmailStr: trimmed, Unicode NFC,
    the domain decoded from punycode), in lower case; so every spelling that
    registration counts as the same address signs in as it. Something that is
    not an address at all is only trimmed and lowered: it matches no one.
    """
    with contextlib.suppress(PydanticCustomError):
        _, email = validate_email(email)
    return email.strip().lower()


def etag(representation_version: int) -> str:
    """The ETag of a user whose last visible change is at this stream version."""
    return f'"{representation_version}"'


def etag_matches(
    header: str, representation_version: int, *, weak: bool = False
) -> bool:
    """Whether an If-Match (strong comparison) or, with `weak`, an If-None-Match
    (weak comparison: `W/"6"` matches `"6"`) header names this version (RFC 9110)."""
    current = etag(representation_version)
    for tag in (part.strip() for part in header.split(",")):
        if weak and tag.startswith("W/"):
            tag = tag[2:]
        if tag == "*" or tag == current:
            return True
    return False
