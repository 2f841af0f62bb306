"""The registry of event types: each has a pydantic model and a schema version.

An event type is declared once, as a model decorated with `event`:

    @event("JobSubmitted", version=2)
    class JobSubmitted(DomainEvent):
        task: str
        payload: dict[str, Any]

    @JobSubmitted.upcaster(from_version=1)
    def add_empty_payload(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "payload": {}}

Stored events keep the schema version they were written with. Reading one runs the
upcasters from that version up to the current one, then validates the model, so
readers only ever see the current shape.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticSerializationError

from shared.errors import InvalidEventData, UnknownEventType

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
# `\u0000` in JSON text, not preceded by another backslash that escapes its own:
# PostgreSQL's jsonb cannot hold a NUL character.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
E = TypeVar("E", bound=type["DomainEvent"])


class DomainEvent(BaseModel):
    """Base of every event's data. Subclasses are immutable and refuse extra keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_type: ClassVar[str]
    schema_version: ClassVar[int]
    upcasters: ClassVar[dict[int, Upcaster]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.upcasters = {}

    @classmethod
    def upcaster(cls, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function that turns `from_version` data into the next version."""

        def register(function: Upcaster) -> Upcaster:
            cls.upcasters[from_version] = function
            return function

        return register


@dataclass(frozen=True)
class EventType:
    name: str
    model: type[DomainEvent]
    version: int

    def upcast(self, data: dict[str, Any], schema_version: int) -> dict[str, Any]:
        for version in range(schema_version, self.version):
            upcaster = self.model.upcasters.get(version)
            if upcaster is None:
                raise InvalidEventData(
                    self.name, f"no upcaster from schema version {version}"
                )
            data = upcaster(data)
        return data


class EventRegistry:
    def __init__(self) -> None:
        self._types: dict[str, EventType] = {}

    def register(self, model: type[DomainEvent], name: str, version: int) -> None:
        existing = self._types.get(name)
        if existing is not None and existing.model is not model:
            raise ValueError(f"event type {name} is registered twice")
        model.event_type = name
        model.schema_version = version
        self._types[name] = EventType(name, model, version)

    def event(self, name: str, *, version: int = 1) -> Callable[[E], E]:
        """Class decorator: register a DomainEvent subclass as event type `name`."""

        def register(model: E) -> E:
            self.register(model, name, version)
            return model

        return register

    def get(self, name: str) -> EventType:
        try:
            return self._types[name]
        except KeyError:
            raise UnknownEventType(name) from None

    def names(self) -> list[str]:
        return sorted(self._types)

    def parse(
        self, name: str, data: dict[str, Any], schema_version: int | None = None
    ) -> DomainEvent:
        """Validate `data` as event `name`, upcasting it first when it is older."""
        event_type = self.get(name)
        if schema_version is not None and schema_version < event_type.version:
            data = event_type.upcast(data, schema_version)
        try:
            return event_type.model.model_validate(data)
        except ValidationError as exc:
            raise InvalidEventData(name, str(exc)) from exc

    def encode(self, event: DomainEvent) -> tuple[EventType, str]:
        """The registered type of `event` and its data as a JSON document.

        The JSON is validated against the model on the way out, so an instance
        built without validation (`model_construct`) cannot put bad data in the log.
        """
        name = getattr(type(event), "event_type", type(event).__name__)
        event_type = self.get(name)
        if event_type.model is not type(event):
            raise UnknownEventType(name)
        try:
            data = event.model_dump_json(warnings=False)
        except PydanticSerializationError as exc:
            # A lone surrogate, say: text that is not Unicode.
            raise InvalidEventData(name, str(exc)) from None
        if "\\u0000" in data and _NUL_ESCAPE.search(data):
            raise InvalidEventData(name, "a text holds a NUL character")
        try:
            event_type.model.model_validate_json(data)
        except ValidationError as exc:
            raise InvalidEventData(name, str(exc)) from exc
        return event_type, data


registry = EventRegistry()
event = registry.event
