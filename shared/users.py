"""What both APIs say about a user: its JSON shape, its ETag, its email's form."""

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict

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
    """The one form an address is stored and compared in: trimmed, lower case."""
    return email.strip().lower()


def etag(representation_version: int) -> str:
    """The ETag of a user whose last visible change is at this stream version."""
    return f'"{representation_version}"'


def etag_matches(if_match: str, representation_version: int) -> bool:
    """Whether an If-Match header (RFC 9110, strong comparison) names this version."""
    current = etag(representation_version)
    candidates = [part.strip() for part in if_match.split(",")]
    return any(tag == "*" or tag == current for tag in candidates)
