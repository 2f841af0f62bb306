"""Events of the job stream, `job-<uuid>`.

A job is submitted once, started once per attempt, and ends with exactly one of
JobSucceeded, JobFailed or JobCancelled. Attempts count from 1.
"""

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import Field

from shared.events.registry import DomainEvent, event

FailureKind = Literal["error", "timeout", "worker_lost"]


@event("JobSubmitted", version=1)
class JobSubmitted(DomainEvent):
    owner_id: UUID
    task: str
    payload: dict[str, Any]
    max_retries: int = Field(ge=0)
    timeout_s: float = Field(gt=0)


@event("JobStarted", version=1)
class JobStarted(DomainEvent):
    attempt: int = Field(ge=1)
    worker: str


@event("JobProgressed", version=1)
class JobProgressed(DomainEvent):
    attempt: int = Field(ge=1)
    progress: float = Field(ge=0, le=1)


@event("JobRetryScheduled", version=1)
class JobRetryScheduled(DomainEvent):
    """The attempt `attempt` failed in a way worth retrying, at `retry_at`."""

    attempt: int = Field(ge=1)
    message: str
    delay_s: float = Field(ge=0)
    retry_at: datetime


@event("JobSucceeded", version=1)
class JobSucceeded(DomainEvent):
    attempt: int = Field(ge=1)
    result_data: dict[str, Any]


@event("JobFailed", version=1)
class JobFailed(DomainEvent):
    attempt: int = Field(ge=0)
    message: str
    kind: FailureKind = "error"


@event("JobCancelRequested", version=1)
class JobCancelRequested(DomainEvent):
    pass


@event("JobCancelled", version=1)
class JobCancelled(DomainEvent):
    """The job stopped for good; `attempt` is 0 when it never started."""

    attempt: int = Field(ge=0)


TERMINAL_EVENTS = frozenset({"JobSucceeded", "JobFailed", "JobCancelled"})
