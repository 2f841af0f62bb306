"""The simplest task types: echo, sleep and fail."""

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, Strict

from shared.jobs.catalog import (
    JobContext,
    JobError,
    JobResult,
    KeepsInt,
    RetryableJobError,
    job_task,
)

SLEEP_STEP_S = 0.2


class EchoPayload(RootModel[dict[str, Any]]):
    pass


@job_task("echo")
def echo(payload: EchoPayload, context: JobContext) -> JobResult:
    """Answer with the payload, unchanged."""
    return payload.root


class SleepPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: Annotated[float, Strict(), Field(gt=0, le=3600), KeepsInt]


@job_task("sleep")
def sleep(payload: SleepPayload, context: JobContext) -> JobResult:
    """Wait `seconds`, reporting progress; a cancel stops it within a second."""
    steps = max(1, math.ceil(payload.seconds / SLEEP_STEP_S))
    step = payload.seconds / steps
    for done in range(steps):
        context.sleep(step)
        context.progress((done + 1) / steps)
    return {"slept": payload.seconds}


class FailPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(default="failed", min_length=1, max_length=10_000)
    retryable: bool = False


@job_task("fail")
def fail(payload: FailPayload, context: JobContext) -> JobResult:
    """End FAILURE with `message`; with `retryable`, after every retry is spent."""
    if payload.retryable:
        raise RetryableJobError(payload.message)
    raise JobError(payload.message)
