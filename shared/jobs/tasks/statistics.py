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


# Past this size, squares (and at last sums and differences) overflow: the values
# are then scaled down by a power of two, which is exact, for the sum, mean and
# stdev, so that no step overflows where the answer itself fits in a double.
SCALE_ABOVE = 2.0**500


@job_task("aggregate")
def aggregate(payload: AggregatePayload, context: JobContext) -> JobResult:
    """count, sum, min, max, mean, sample stdev and linear-interpolated percentiles."""
    values = np.asarray(payload.values, dtype=np.float64)
    count = len(values)
    low, high = float(values.min()), float(values.max())
    largest = max(abs(low), abs(high))
    exponent = math.frexp(largest)[1] if largest > SCALE_ABOVE else 0
    scaled = np.ldexp(values, -exponent) if exponent else values
    scaled_total = math.fsum(scaled.tolist() if exponent else payload.values)
    scaled_mean = scaled_total / count
    if count > 1:
        deviations = float(np.sum(np.square(scaled - scaled_mean)))
        stdev = _ldexp(math.sqrt(deviations / (count - 1)), exponent)
    else:
        stdev = 0.0
    # numpy's default method ("linear") interpolates between the closest ranks;
    # only where a step between two ranks overflows is it done on scaled values.
    with np.errstate(over="ignore", invalid="ignore"):
        points = np.percentile(values, payload.percentiles or [])
    if not np.all(np.isfinite(points)):
        points = np.ldexp(np.percentile(scaled, payload.percentiles), exponent)
    return {
        "count": count,
        "sum": _finite("sum", _ldexp(scaled_total, exponent)),
        "min": low,
        "max": high,
        "mean": _ldexp(scaled_mean, exponent),
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
