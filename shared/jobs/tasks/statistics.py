"""aggregate: summary statistics and percentiles of a list of numbers."""

import json
import math
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict

from shared.jobs.catalog import JobContext, JobError, JobResult, KeepsInt, job_task

Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Percentile = Annotated[float, Strict(), Field(ge=0, le=100), KeepsInt]


class AggregatePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: list[Number] = Field(min_length=1, max_length=1_000_000)
    percentiles: list[Percentile] = Field(default=[50, 90, 99], max_length=101)


@job_task("aggregate")
def aggregate(payload: AggregatePayload, context: JobContext) -> JobResult:
    """count, sum, min, max, mean, sample stdev and linear-interpolated percentiles.

    Each figure is computed on the values as given; only where a step overflows
    (a sum of values near the limit of a double, the square of a deviation
    past 1e154) is it computed again on the values scaled down by a power of
    two, which is exact, so no step overflows where the answer itself fits.
    """
    values = np.asarray(payload.values, dtype=np.float64)
    count = len(values)
    low, high = float(values.min()), float(values.max())
    exponent = math.frexp(max(abs(low), abs(high)))[1]
    scaled = np.ldexp(values, -exponent)
    try:
        total = math.fsum(payload.values)
    except OverflowError:
        total = math.inf
    if math.isfinite(total):
        mean = total / count
    else:
        scaled_total = math.fsum(scaled.tolist())
        total = _ldexp(scaled_total, exponent)
        mean = _ldexp(scaled_total / count, exponent)
    stdev = 0.0
    if count > 1:
        with np.errstate(over="ignore", invalid="ignore"):
            deviations = float(np.sum(np.square(values - mean)))
        if math.isfinite(deviations):
            stdev = math.sqrt(deviations / (count - 1))
        else:
            shifted = scaled - math.ldexp(mean, -exponent)
            deviations = float(np.sum(np.square(shifted)))
            stdev = _ldexp(math.sqrt(deviations / (count - 1)), exponent)
    # numpy's default method ("linear") interpolates between the closest ranks.
    with np.errstate(over="ignore", invalid="ignore"):
        points = np.percentile(values, payload.percentiles or [])
    if not np.all(np.isfinite(points)):
        points = np.ldexp(np.percentile(scaled, payload.percentiles), exponent)
    return {
        "count": count,
        "sum": _finite("sum", total),
        "min": low,
        "max": high,
        "mean": mean,
        "stdev": _finite("standard deviation", stdev),
        # Keys are the percentiles written as the client wrote them: 50 or 50.0.
        "percentiles": {
            json.dumps(p): float(point)
            for p, point in zip(payload.percentiles, points, strict=True)
        },
    }


def _ldexp(value: float, exponent: int) -> float:
    try:
        return math.ldexp(value, exponent)
    except OverflowError:
        return math.inf


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise JobError(f"the {name} of these values is beyond the range of a double")
    return value
