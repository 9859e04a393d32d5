"""GET /v1/audit/export: the decisions of a time range as a verifiable JSON Lines or CSV file."""

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Final

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from service.api.auth import AUTH_RESPONSES, AuditExporter, record_access
from service.api.deps import State
from service.api.time_range import End, Start, time_range
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
from service.core.ports import ExplanationStore
from service.errors import FieldProblem, InvalidRequest

router = APIRouter(tags=["audit"])

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
    start: Start = None,
    end: End = None,
    model_version: Version = None,
    decision: Decision = None,
    export_format: Annotated[ExportFormat, Query(alias="format")] = ExportFormat.JSONL,
) -> StreamingResponse:
    """Decision records, explanations and integrity hashes, streamed (needs `audit:export`)."""
    start, end = time_range(start, end)
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
