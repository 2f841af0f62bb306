"""Event types of HelixNet Core. Importing this package registers all of them."""

from shared.events import (
    job,  # noqa: F401 (registers the job events)
    user,  # noqa: F401 (registers the user events)
)
from shared.events.registry import (
    DomainEvent,
    EventRegistry,
    EventType,
    event,
    registry,
)

__all__ = ["DomainEvent", "EventRegistry", "EventType", "event", "registry"]
