"""GET /v1/audit/access-log: who read which explanation or exported which audit, and when."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from service.api.auth import AuditExporter
from service.api.deps import State
from service.api.time_range import End, Start, time_range
from service.core.access import Action

router = APIRouter(tags=["audit"])

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
    start: Start = None,
    end: End = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1_000,
) -> AccessLog:
    """Recorded explanation reads and audit exports, and refused attempts, oldest first (needs
    `audit:export`)."""
    since, until = time_range(start, end)
    # One more than asked tells whether the list was cut.
    found = await state.access.entries(since, until, limit + 1)
    return AccessLog(
        entries=[
            AccessLogEntry(at=e.at, key_name=e.key_name, action=e.action, target=e.target)
            for e in found[:limit]
        ],
        truncated=len(found) > limit,
    )
