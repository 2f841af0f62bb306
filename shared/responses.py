"""What the OpenAPI schema says a route answers besides its success, and with
which headers, so that a generated client knows every status it must handle.

    @router.post("/", status_code=202, responses=documented(
        202, headers=(LOCATION, POSITION), errors=(401, 409)))
"""

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    """Why a request was refused, for a person to read."""

    detail: str


Header = tuple[str, str]

LOCATION: Header = ("Location", "Where the resource can be read")
POSITION: Header = (
    "Helix-Position",
    "The log position of the last event this command appended; send it back"
    " on a GET to read your own write",
)
ETAG: Header = ("ETag", "The version of this representation")
RETRY_AFTER: Header = ("Retry-After", "Seconds to wait before trying again")
WWW_AUTHENTICATE: Header = ("WWW-Authenticate", "Bearer")

_ERRORS: dict[int, tuple[str, tuple[Header, ...]]] = {
    304: ("The representation still has the ETag sent in If-None-Match", (ETAG,)),
    400: ("A grant_type other than password (`error`: unsupported_grant_type)", ()),
    401: (
        "No bearer token, or one that is invalid, expired or revoked",
        (WWW_AUTHENTICATE,),
    ),
    403: ("Signed in, but not allowed to do this", ()),
    404: ("No such resource, or another user's", ()),
    409: ("The request conflicts with the resource's current state", ()),
    412: ("If-Match names a version that is no longer current", ()),
    413: ("The request body is larger than 1 MiB", ()),
    415: ("The body is not sent as application/json", ()),
    429: ("Too many failed sign-ins; try again later", (RETRY_AFTER,)),
    503: (
        "A dependency is down, or the read model has not caught up with the"
        " Helix-Position sent",
        (RETRY_AFTER,),
    ),
}


def documented(
    success: int,
    *,
    headers: tuple[Header, ...] = (),
    errors: tuple[int, ...] = (),
) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route: its success's headers, and its errors.

    Every route may also answer 503 (PostgreSQL or another dependency down).
    """
    responses: dict[int | str, dict[str, Any]] = {}
    if headers:
        responses[success] = {"headers": _headers(headers)}
    for status in sorted({*errors, 503}):
        description, sent = _ERRORS[status]
        response: dict[str, Any] = {"description": description}
        if status != 304:
            response["model"] = Problem
        if sent:
            response["headers"] = _headers(sent)
        responses[status] = response
    return responses


def _headers(headers: tuple[Header, ...]) -> dict[str, Any]:
    return {
        name: {"description": description, "schema": {"type": "string"}}
        for name, description in headers
    }
