"""The job as both APIs show it over HTTP."""

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from shared.jobs.state import JobStatus


class JobOut(BaseModel):
    id: UUID
    task: str
    status: JobStatus
    result_data: dict[str, Any] | None
    message: str | None
    progress: float
    attempts: int
    owner_id: UUID
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    items: list[JobOut]
    total: int
