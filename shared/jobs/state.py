"""The job aggregate: a job's state folded from the events of its stream.

The command API decides a cancel from it and answers submissions with it; the
worker decides from it whether to run a delivery, and which event ends it.
"""

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from shared.errors import NotFound
from shared.event_store import RecordedEvent, stream_name

JobStatus = Literal["PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def job_stream(job_id: UUID) -> str:
    return stream_name("job", job_id)


def job_lock_key(stream: str) -> str:
    """SQL for the key of the advisory lock a worker holds while it runs a job;
    `stream` is SQL that gives the job's stream name."""
    return f"hashtextextended({stream}, 0)"


def job_changes(recorded: RecordedEvent) -> dict[str, Any]:
    """What an event after JobSubmitted changes in a job, field by field.

    The one definition of a job's transitions: the aggregate here and the jobs
    read model (`projectors/projections/jobs.py`) both apply it, so the status
    the worker decides on and the one clients read cannot drift apart.
    """
    data, at = recorded.data, recorded.recorded_at
    match recorded.type:
        case "JobStarted":
            # A new attempt starts from nothing.
            return {
                "status": "STARTED",
                "attempts": data["attempt"],
                "started_at": at,
                "progress": 0.0,
                "retry_at": None,
            }
        case "JobProgressed":
            return {"progress": data["progress"]}
        case "JobRetryScheduled":
            return {
                "status": "RETRY",
                "message": data["message"],
                "retry_at": datetime.fromisoformat(data["retry_at"]),
            }
        case "JobSucceeded":
            return {
                "status": "SUCCESS",
                "result_data": data["result_data"],
                "message": None,
                "progress": 1.0,
                "finished_at": at,
            }
        case "JobFailed":
            return {
                "status": "FAILURE",
                "message": data["message"],
                "finished_at": at,
                "retry_at": None,
            }
        case "JobCancelRequested":
            return {"cancel_requested": True}
        case "JobCancelled":
            return {
                "status": "REVOKED",
                "message": "cancelled",
                "finished_at": at,
                "retry_at": None,
            }
    return {}


@dataclass(frozen=True)
class JobState:
    id: UUID
    owner_id: UUID
    task: str
    payload: dict[str, Any]
    max_retries: int
    timeout_s: float
    submitted_at: datetime
    version: int = 1
    status: JobStatus = "PENDING"
    attempts: int = 0
    cancel_requested: bool = False
    progress: float = 0.0
    result_data: dict[str, Any] | None = None
    message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_position: int = 0
    submitted_event_id: UUID | None = None
    correlation_id: str | None = None
    retry_at: datetime | None = None
    history: tuple[str, ...] = field(default=(), repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def lost_runs(self) -> int:
        """Runs whose worker was lost before they ended: each start that the
        next start took over from, not from a scheduled retry."""
        lost = 0
        previous = None
        for kind in self.history:
            if kind in ("JobStarted", "JobRetryScheduled"):
                lost += kind == previous == "JobStarted"
                previous = kind
        return lost

    def started(self, attempt: int, **changes: Any) -> "JobState":
        """This state once run `attempt` has started, before its JobStarted is
        read back (so without its time)."""
        return replace(
            self,
            status="STARTED",
            attempts=attempt,
            progress=0.0,
            retry_at=None,
            history=(*self.history, "JobStarted"),
            **changes,
        )

    @classmethod
    def from_events(cls, events: list[RecordedEvent]) -> "JobState":
        """Fold a job stream, oldest first; raises NotFound for an empty one."""
        if not events or events[0].type != "JobSubmitted":
            raise NotFound("job not found")
        first = events[0]
        data = first.data
        state = cls(
            id=UUID(first.stream_id.removeprefix("job-")),
            owner_id=UUID(str(data["owner_id"])),
            task=data["task"],
            payload=data["payload"],
            max_retries=int(data["max_retries"]),
            timeout_s=float(data["timeout_s"]),
            submitted_at=first.recorded_at,
            last_position=first.position,
            submitted_event_id=first.event_id,
            correlation_id=first.metadata.get("correlation_id"),
            history=(first.type,),
        )
        for recorded in events[1:]:
            state = state.apply(recorded)
        return state

    def apply(self, recorded: RecordedEvent) -> "JobState":
        return replace(
            self,
            version=recorded.version,
            last_position=recorded.position,
            history=(*self.history, recorded.type),
            **job_changes(recorded),
        )

    def view(self) -> dict[str, Any]:
        """The job as the HTTP API shows it."""
        return {
            "id": self.id,
            "task": self.task,
            "status": self.status,
            "result_data": self.result_data,
            "message": self.message,
            "progress": self.progress,
            "attempts": self.attempts,
            "owner_id": self.owner_id,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
