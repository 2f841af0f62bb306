"""The job catalog and the job aggregate, shared by the APIs and the worker."""

from shared.jobs.catalog import (
    InvalidPayload,
    JobCatalog,
    JobContext,
    JobError,
    JobInterrupted,
    JobResult,
    KeepsInt,
    RetryableJobError,
    TaskType,
    UnknownTask,
    catalog,
    job_task,
    load_catalog,
)

__all__ = [
    "InvalidPayload",
    "JobCatalog",
    "JobContext",
    "JobError",
    "JobInterrupted",
    "JobResult",
    "KeepsInt",
    "RetryableJobError",
    "TaskType",
    "UnknownTask",
    "catalog",
    "job_task",
    "load_catalog",
]
