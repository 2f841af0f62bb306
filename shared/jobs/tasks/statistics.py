"""aggregate: summary statistics and percentiles of a list of numbers."""

import json
import math
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict

from shared.jobs.catalog import JobContext, JobResult, KeepsInt, job_task

Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Percentile = Annotated[float, Strict(), Field(ge=0, le=100), KeepsInt]


class AggregatePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: list[Number] = Field(min_length=1, max_length=1_000_000)
    percentiles: list[Percentile] = Field(default=[50, 90, 99], max_length=101)


@job_task("aggregate")
def aggregate(payload: AggregatePayload, context: JobContext) -> JobResult:
    """count, sum, min, max, mean, sample stdev and linear-interpolated percentiles."""
    values = np.asarray(payload.values, dtype=np.float64)
    count = len(values)
    total = math.fsum(payload.values)
    mean = total / count
    if count > 1:
        stdev = math.sqrt(float(np.sum(np.square(values - mean))) / (count - 1))
    else:
        stdev = 0.0
    # numpy's default method ("linear") interpolates between the closest ranks.
    points: list[float] = (
        np.percentile(values, payload.percentiles).tolist()
        if payload.percentiles
        else []
    )
    return {
        "count": count,
        "sum": total,
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": mean,
        "stdev": stdev,
        # Keys are the percentiles written as the client wrote them: 50 or 50.0.
        "percentiles": {
            json.dumps(p): point
            for p, point in zip(payload.percentiles, points, strict=True)
        },
    }
