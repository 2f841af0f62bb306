"""Event types that exist only in tests, in a registry of their own."""

from typing import Any

from shared.events.registry import DomainEvent, EventRegistry

sample_events = EventRegistry()


class ThingHappened(DomainEvent):
    name: str
    size: int = 0


class ThingRenamed(DomainEvent):
    old_name: str
    new_name: str


sample_events.register(ThingHappened, "ThingHappened", version=2)
sample_events.register(ThingRenamed, "ThingRenamed", version=1)


@ThingHappened.upcaster(from_version=1)
def size_was_called_count(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["size"] = data.pop("count", 0)
    return data
