"""The errors of HelixNet Core, raised by `shared` and the components.

    HelixError
    ├── ValidationFailed          input broke a rule; nothing was stored
    │   ├── UnknownEventType
    │   └── InvalidEventData
    ├── NotFound
    ├── PermissionDenied
    ├── Conflict                  the state changed under the caller
    │   ├── WrongExpectedVersion  optimistic concurrency on one stream
    │   ├── DuplicateEventId      an event id reused for different content
    │   └── PreconditionFailed    If-Match named a representation that changed
    ├── Throttled                 too many failed attempts; `retry_after_s` says when
    ├── Unavailable               a dependency is down; retrying later may work
    │   └── StoreUnavailable      PostgreSQL could not be reached
    └── Misconfigured             the settings cannot serve this; an operator must
        └── KeyUnavailable        no master key listed unwraps a user's data key

Driver exceptions are translated at the boundary (`raise ... from exc`); only the
APIs turn these into HTTP answers.
"""


class HelixError(Exception):
    retryable = False


class ValidationFailed(HelixError):
    """`loc` names the input that broke the rule, as in a pydantic error."""

    def __init__(self, message: str, *, loc: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc


class UnknownEventType(ValidationFailed):
    def __init__(self, event_type: str) -> None:
        super().__init__(f"unknown event type {event_type!r}")
        self.event_type = event_type


class InvalidEventData(ValidationFailed):
    def __init__(self, event_type: str, detail: str) -> None:
        super().__init__(f"invalid data for {event_type}: {detail}")
        self.event_type = event_type


class NotFound(HelixError):
    pass


class PermissionDenied(HelixError):
    pass


class Conflict(HelixError):
    pass


class WrongExpectedVersion(Conflict):
    def __init__(self, stream_id: str, expected: int | None, actual: int) -> None:
        super().__init__(
            f"stream {stream_id} is at version {actual}, expected {expected}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventId(Conflict):
    pass


class PreconditionFailed(Conflict):
    pass


class Throttled(HelixError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(HelixError):
    retryable = True


class StoreUnavailable(Unavailable):
    pass


class Misconfigured(HelixError):
    pass


class KeyUnavailable(Misconfigured):
    pass
