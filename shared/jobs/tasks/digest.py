"""checksum: a hash of a text's UTF-8 bytes."""

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict

from shared.jobs.catalog import JobContext, JobResult, job_task


class ChecksumPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str
    algorithm: Literal["sha256", "sha512", "sha1", "md5", "blake2b"] = "sha256"


@job_task("checksum")
def checksum(payload: ChecksumPayload, context: JobContext) -> JobResult:
    """The hex digest of the UTF-8 bytes of `data` with `algorithm`."""
    # md5 and sha1 are offered for matching other systems' checksums, not security.
    digest = hashlib.new(payload.algorithm, usedforsecurity=False)
    digest.update(payload.data.encode("utf-8"))
    return {"algorithm": payload.algorithm, "hexdigest": digest.hexdigest()}
