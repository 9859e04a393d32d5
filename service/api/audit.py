"""GET /v1/audit/export: the decisions of a time range as a verifiable JSON Lines or CSV file."""

from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from service.api.auth import AUTH_RESPONSES, AuditExporter, record_access
from service.api.deps import DateTime, State
from service.core.access import Action
from service.core.export import (
    MIN_VERSION_PREFIX,
    AuditExport,
    ExportFormat,
    ExportQuery,
    QueryError,
    SchemaLookup,
    access_target,
    scan_versions,
    schemas_from,
    select_versions,
)
from service.errors import FieldProblem, InvalidRequest
from service.ports import ExplanationStore

router = APIRouter(tags=["audit"])

# Bounds one request (Cassandra reads day_buckets partitions per day and version); an auditor
# exports a longer period as several files.
MAX_RANGE: Final = timedelta(days=366)
MEDIA_TYPES: Final = {ExportFormat.JSONL: "application/x-ndjson", ExportFormat.CSV: "text/csv"}

Version = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=128,
        description="Only this model version, or a unique prefix of it (at least "
        f"{MIN_VERSION_PREFIX} characters; logs print 12).",
    ),
]
Decision = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=128,
        description="Only this outcome: approve or deny (binary models), or a class of a "
        "multiclass model in the export.",
    ),
]


def _utc(moment: datetime, field: str) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise InvalidRequest(
            "The time is out of range.", [FieldProblem(field, "out of range in UTC")]
        ) from None


def _check_range(start: datetime, end: datetime) -> None:
    if end <= start:
        raise InvalidRequest(
            "The export range is empty.", [FieldProblem("end", "must be after start")]
        )
    if end - start > MAX_RANGE:
        raise InvalidRequest(
            f"At most {MAX_RANGE.days} days per export.",
            [FieldProblem("end", f"must be at most {MAX_RANGE.days} days after start")],
        )


def _file_name(query: ExportQuery) -> str:
    start, end = query.start, query.end
    return f"shapstream-audit-{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}.{query.format}"


async def _body(
    store: ExplanationStore, query: ExportQuery, schemas: SchemaLookup
) -> AsyncIterator[bytes]:
    # A failure once streaming has begun can only cut the file short: `audit verify` then
    # reports the manifest missing, so a partial export is never taken for a whole one.
    export = AuditExport(query, schemas)
    records = scan_versions(store, query.model_versions, query.start, query.end)
    async with aclosing(records):
        async for chunk in export.chunks(records):
            yield chunk


@router.get(
    "/v1/audit/export",
    response_class=StreamingResponse,
    responses={
        **AUTH_RESPONSES,
        200: {
            "description": "One row per decision, then a manifest line (see the README).",
            "content": {media_type: {} for media_type in MEDIA_TYPES.values()},
        },
    },
)
async def export_audit(
    state: State,
    caller: AuditExporter,
    start: Annotated[DateTime, Query(description="Inclusive, with a time zone.")],
    end: Annotated[DateTime, Query(description="Exclusive, with a time zone.")],
    model_version: Version = None,
    decision: Decision = None,
    export_format: Annotated[ExportFormat, Query(alias="format")] = ExportFormat.JSONL,
) -> StreamingResponse:
    """Decision records, explanations and integrity hashes, streamed (needs `audit:export`)."""
    start, end = _utc(start, "start"), _utc(end, "end")
    _check_range(start, end)
    schemas = schemas_from(state.store.get_model)
    try:
        versions = await select_versions(state.store, schemas, model_version, decision)
    except QueryError as error:
        raise InvalidRequest(
            f"{error.field}: {error.reason}.",
            [FieldProblem(error.field, error.reason)],
        ) from None
    query = ExportQuery(start, end, versions, decision, export_format)
    chosen = versions[0] if model_version is not None else None
    # Logged before the first byte leaves; if the log cannot be written, nothing is exported.
    await record_access(state, caller, Action.AUDIT_EXPORT, access_target(query, chosen))
    return StreamingResponse(
        _body(state.store, query, schemas),
        media_type=MEDIA_TYPES[export_format],
        headers={"Content-Disposition": f'attachment; filename="{_file_name(query)}"'},
    )
