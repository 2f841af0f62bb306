"""Read-your-writes: answer a GET only once the projections it reads are fresh.

Every command answer carries `Helix-Position`, the global position of the last
event it appended. A GET that sends it back waits, up to
`settings.read_your_writes_timeout_s`, until each projection the route reads has
processed that position; past the bound it gets 503 with Retry-After, so a client
never reads a table that does not yet show its own write:

    @router.get("/users/{user_id}", dependencies=[Depends(consistent_read("users"))])

Naming no projection waits for the log itself: until the event is below the
read horizon for routes that read across streams (the audit), or only until it
is there for those that read one stream (`horizon=False`).
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Header, HTTPException, Request

from shared.checkpoints import wait_until_processed
from shared.errors import ValidationFailed
from shared.inputs import MAX_BIGINT
from shared.web import validation_error

log = logging.getLogger(__name__)

POSITION_HEADER = "Helix-Position"
RETRY_AFTER_S = 1


def consistent_read(
    *projections: str, horizon: bool = True
) -> Callable[..., Awaitable[None]]:
    """A dependency that waits for `projections` (none: the log's readers) to
    reach the request's position."""

    async def wait_for_projections(
        request: Request,
        helix_position: Annotated[
            str | None,
            Header(
                alias=POSITION_HEADER,
                description="Answer only once this position of the log is read.",
            ),
        ] = None,
    ) -> None:
        if helix_position is None:
            return
        text = helix_position.strip()
        digits = text.isascii() and text.isdigit() and len(text) <= 19
        if not digits or not 1 <= int(text) <= MAX_BIGINT:
            raise validation_error(
                ("header", POSITION_HEADER),
                f"{POSITION_HEADER} must be a positive integer (a log position)",
            )
        state = request.app.state
        try:
            fresh = await wait_until_processed(
                state.engine,
                projections,
                int(text),
                timeout_s=state.settings.read_your_writes_timeout_s,
                horizon=horizon,
            )
        except ValidationFailed as exc:
            raise validation_error(("header", POSITION_HEADER), str(exc)) from None
        if not fresh:
            log.warning(
                "read-your-writes wait timed out",
                extra={"position": int(text), "projections": list(projections)},
            )
            raise HTTPException(
                503,
                f"the read model has not yet caught up with position {text}",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    return wait_for_projections
