"""GET /v1/audit/access-log: who read which explanation or exported which audit, and when."""

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from service.api.auth import AuditExporter
from service.api.deps import DateTime, State
from service.core.access import Action
from service.errors import FieldProblem, InvalidRequest

router = APIRouter(tags=["audit"])

DEFAULT_WINDOW = timedelta(days=1)
# Bounds one request's work (a Cassandra read per day and bucket); page with later `start`s.
MAX_WINDOW = timedelta(days=366)
MAX_LIMIT = 10_000


class AccessLogEntry(BaseModel):
    at: datetime
    key_name: str
    action: Action
    target: str


class AccessLog(BaseModel):
    entries: list[AccessLogEntry]
    # True when `limit` cut the list: ask again from the last entry's `at`.
    truncated: bool


@router.get(
    "/v1/audit/access-log",
    response_model=AccessLog,
    responses={
        401: {"description": "no valid API key"},
        403: {"description": "the key lacks the audit:export scope"},
    },
)
async def list_access_log(
    state: State,
    caller: AuditExporter,
    start: Annotated[
        DateTime | None, Query(description="Inclusive; default one day before `end`.")
    ] = None,
    end: Annotated[DateTime | None, Query(description="Exclusive; default now.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1_000,
) -> AccessLog:
    """Recorded explanation reads and audit exports, oldest first (needs `audit:export`)."""
    until = end or datetime.now(UTC)
    since = start or _window_before(until)
    if since >= until:
        raise InvalidRequest("The range is empty.", [FieldProblem("end", "must be after start")])
    if until - since > MAX_WINDOW:
        raise InvalidRequest(
            f"At most {MAX_WINDOW.days} days per request.",
            [FieldProblem("end", f"must be at most {MAX_WINDOW.days} days after start")],
        )
    # One more than asked tells whether the list was cut.
    found = await state.access.entries(since, until, limit + 1)
    return AccessLog(
        entries=[
            AccessLogEntry(at=e.at, key_name=e.key_name, action=e.action, target=e.target)
            for e in found[:limit]
        ],
        truncated=len(found) > limit,
    )


def _window_before(moment: datetime) -> datetime:
    try:
        return moment - DEFAULT_WINDOW
    except OverflowError:  # `end` within a day of the earliest time there is
        return datetime.min.replace(tzinfo=UTC)
