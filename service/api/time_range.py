"""The time range of an audit request (export, access log): defaults, UTC, and its bound."""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

from fastapi import Query

from service.api.deps import DateTime
from service.errors import FieldProblem, InvalidRequest

DEFAULT_SPAN: Final = timedelta(days=1)
# Bounds one request's work (Cassandra reads each day's partitions, per model version for an
# export); a longer period is asked for as several requests.
MAX_SPAN: Final = timedelta(days=366)

Start = Annotated[
    DateTime | None,
    Query(description="Inclusive, with a time zone; default one day before `end`."),
]
End = Annotated[
    DateTime | None,
    Query(
        description=f"Exclusive, with a time zone; default now. At most {MAX_SPAN.days} days "
        "after `start`."
    ),
]


def time_range(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """[start, end) in UTC, defaulting to the day before now; a 422 when empty or too long."""
    until = datetime.now(UTC) if end is None else _utc(end, "end")
    since = _day_before(until) if start is None else _utc(start, "start")
    if since >= until:
        raise InvalidRequest("The range is empty.", [FieldProblem("end", "must be after start")])
    if until - since > MAX_SPAN:
        raise InvalidRequest(
            f"At most {MAX_SPAN.days} days per request.",
            [FieldProblem("end", f"must be at most {MAX_SPAN.days} days after start")],
        )
    return since, until


def _utc(moment: datetime, field: str) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise InvalidRequest(
            "The time is out of range.", [FieldProblem(field, "out of range in UTC")]
        ) from None


def _day_before(moment: datetime) -> datetime:
    try:
        return moment - DEFAULT_SPAN
    except OverflowError:  # `end` within a day of the earliest time there is
        return datetime.min.replace(tzinfo=UTC)
