"""Job commands over HTTP: submit and cancel."""

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, HTTPException, Request, Response
from pydantic import ConfigDict, Field, Strict

from command_api.dependencies import CurrentUser, Store
from command_api.job_commands import JobResult, Submission, cancel_job, submit_job
from shared.inputs import RequestBody
from shared.jobs import InvalidPayload, UnknownTask, load_catalog
from shared.jobs.views import JobOut
from shared.responses import LOCATION, POSITION, documented
from shared.web import client_errors

POSITION_HEADER = "Helix-Position"

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


class JobSubmission(RequestBody):
    model_config = ConfigDict(extra="forbid")

    # Strict: `true` is no retry count and `"5"` no number of seconds.
    task: str = Field(min_length=1, max_length=100)
    payload: dict[str, Any] = Field(default_factory=dict)
    max_retries: Annotated[int, Strict()] = Field(default=3, ge=0, le=10)
    timeout_s: Annotated[float, Strict()] = Field(default=300.0, gt=0, le=3600)


def answer_with(response: Response, result: JobResult) -> dict[str, Any]:
    response.headers[POSITION_HEADER] = str(result.position)
    response.headers["Location"] = f"/api/v1/jobs/{result.job.id}"
    return result.job.view()


def refuse_unless_valid(body: JobSubmission) -> None:
    """422 at once for an unknown task or a payload its model refuses."""
    try:
        load_catalog().validate(body.task, body.payload)
    except UnknownTask as exc:
        detail = {
            "loc": ["body", "task"],
            "msg": str(exc),
            "type": "unknown_task",
            "known_tasks": exc.known,
        }
        raise HTTPException(422, client_errors([detail])) from None
    except InvalidPayload as exc:
        errors = [{**error, "loc": ["body", *error["loc"]]} for error in exc.errors]
        raise HTTPException(422, client_errors(errors)) from None


@router.post(
    "/",
    status_code=202,
    response_model=JobOut,
    responses=documented(
        202, headers=(LOCATION, POSITION), errors=(401, 409, 413, 415)
    ),
)
async def submit(
    body: JobSubmission,
    request: Request,
    response: Response,
    store: Store,
    principal: CurrentUser,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> Any:
    """Submit a job; the same Idempotency-Key within 24 hours returns the same job."""
    refuse_unless_valid(body)
    result = await submit_job(
        store=store,
        principal=principal,
        submission=Submission(
            task=body.task,
            payload=body.payload,
            max_retries=body.max_retries,
            timeout_s=body.timeout_s,
        ),
        idempotency_key=idempotency_key,
        correlation_id=getattr(request.state, "request_id", None),
    )
    return answer_with(response, result)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses=documented(202, headers=(LOCATION, POSITION), errors=(401, 404, 409)),
)
async def cancel(
    job_id: UUID,
    request: Request,
    response: Response,
    store: Store,
    principal: CurrentUser,
) -> Any:
    """Cancel a job: a pending one ends REVOKED, a running one is told to stop."""
    result = await cancel_job(
        store=store,
        principal=principal,
        job_id=job_id,
        correlation_id=getattr(request.state, "request_id", None),
    )
    return answer_with(response, result)
