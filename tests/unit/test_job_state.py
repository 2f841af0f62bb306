"""A job's transitions, as the aggregate and the jobs read model apply them."""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from projectors.projections.jobs import apply_event, submitted_row
from shared.event_store import RecordedEvent
from shared.jobs.state import JobState

JOB = uuid.uuid4()
START = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SHARED_FIELDS = (
    "status",
    "attempts",
    "progress",
    "message",
    "result_data",
    "cancel_requested",
    "started_at",
    "finished_at",
    "retry_at",
)


def event(version: int, event_type: str, **data: Any) -> RecordedEvent:
    return RecordedEvent(
        position=version,
        transaction_id=1000 + version,
        stream_id=f"job-{JOB}",
        category="job",
        version=version,
        event_id=uuid.uuid4(),
        type=event_type,
        schema_version=1,
        data=data,
        metadata={},
        recorded_at=START + timedelta(seconds=version),
    )


SUBMITTED = event(
    1,
    "JobSubmitted",
    owner_id=str(uuid.uuid4()),
    task="sleep",
    payload={},
    max_retries=1,
    timeout_s=60.0,
)


def retry_scheduled(version: int) -> RecordedEvent:
    retry_at = (START + timedelta(minutes=1)).isoformat()
    return event(
        version,
        "JobRetryScheduled",
        attempt=1,
        message="busy",
        delay_s=2.0,
        retry_at=retry_at,
    )


LIVES = {
    "succeeds after a retry": [
        event(2, "JobStarted", attempt=1, worker="w/1"),
        event(3, "JobProgressed", attempt=1, progress=0.5),
        retry_scheduled(4),
        event(5, "JobStarted", attempt=2, worker="w/2"),
        event(6, "JobSucceeded", attempt=2, result_data={"slept": 1}),
    ],
    "cancelled while running": [
        event(2, "JobStarted", attempt=1, worker="w/1"),
        event(3, "JobProgressed", attempt=1, progress=0.25),
        event(4, "JobCancelRequested"),
        event(5, "JobCancelled", attempt=1),
    ],
    "fails after its retry": [
        event(2, "JobStarted", attempt=1, worker="w/1"),
        retry_scheduled(3),
        event(4, "JobFailed", attempt=1, message="gave up"),
    ],
}


@pytest.mark.parametrize("life", LIVES)
def test_the_aggregate_and_the_read_row_agree_after_every_event(life):
    events = [SUBMITTED, *LIVES[life]]
    row = submitted_row(SUBMITTED)
    for count, recorded in enumerate(events[1:], start=2):
        row = apply_event(row, recorded)
        state = JobState.from_events(events[:count])
        for name in SHARED_FIELDS:
            assert getattr(state, name) == row[name], (recorded.type, name)


def test_a_new_attempt_starts_without_the_last_ones_progress():
    events = [SUBMITTED, *LIVES["succeeds after a retry"][:4]]

    state = JobState.from_events(events)

    assert (state.status, state.attempts, state.progress) == ("STARTED", 2, 0.0)
    assert state.retry_at is None
