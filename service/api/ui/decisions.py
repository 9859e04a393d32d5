"""Console pages of decisions: one decision with its waterfall, the list of recent ones."""

import heapq
from datetime import UTC, date, datetime, timedelta
from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import RedirectResponse, Response

from service.api.auth import note_denial, record_access
from service.api.deps import AppState, app_state
from service.api.ui.charts import threshold_margin, waterfall_chart
from service.api.ui.pages import Viewer, console_of, render, require_viewer
from service.core.access import Action, Scope
from service.core.integrity import verify_record
from service.core.records import DecisionCursor, DecisionRecord, DecisionSummary
from service.core.registry import LoadedModel
from service.core.waterfall import Axis, output_names, waterfall
from service.errors import FieldProblem, InvalidRequest, NotFound

router = APIRouter(include_in_schema=False)

Reader = Annotated[Viewer, require_viewer(Scope.EXPLANATIONS_READ)]
TransactionId = Annotated[str, Path(min_length=1, max_length=128)]
PAGE_ROWS = 50
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def opened_record(
    request: Request, viewer: Viewer, transaction_id: str
) -> tuple[DecisionRecord, LoadedModel]:
    """The record a person opens, logged under their key as an API read is; 404 page if none."""
    state = app_state(request)
    record = await state.store_guard.call(lambda: state.store.get(transaction_id))
    if record is None:
        note_denial(state, request, Action.DENIED_NOT_FOUND, viewer.caller.name)
        raise NotFound(f"No explanation for transaction {transaction_id!r} (yet).")
    await record_access(state, viewer.caller, Action.EXPLANATION_READ, transaction_id)
    model = await state.registry.get_version(record.model.version, state.store.get_model)
    return record, model


@router.get("/ui/search")
async def find(
    request: Request,
    viewer: Reader,
    transaction_id: Annotated[str, Query(max_length=128)] = "",
) -> Response:
    """The search box: straight to the decision's page."""
    root = request.scope.get("root_path", "")
    wanted = transaction_id.strip()
    if not wanted:
        return RedirectResponse(f"{root}/ui/decisions", status_code=303)
    return RedirectResponse(f"{root}/ui/decisions/{quote(wanted, safe='')}", status_code=303)


@router.get("/ui/decisions/{transaction_id}")
async def decision_page(
    request: Request,
    viewer: Reader,
    transaction_id: TransactionId,
    output: Annotated[str | None, Query(alias="class", max_length=256)] = None,
) -> Response:
    """A decision: outcome, waterfall, reasons, inputs, and its record's integrity."""
    record, model = await opened_record(request, viewer, transaction_id)
    console = console_of(request)
    schema = model.schema
    outputs = output_names(schema)
    index = _output_index(outputs, output)
    axes = console.axis(model)
    axis = axes[index] if axes is not None else _own_axis(record, index)
    chart = waterfall(record, schema, index, axis, console.settings.max_bars)
    rule = schema.decision
    context = {
        "viewer": viewer,
        "record": record,
        "schema": schema,
        "chart": waterfall_chart(chart, threshold_margin(rule.deny_at_or_above if rule else None)),
        "outputs": outputs,
        "selected": outputs[index],
        "rule": rule,
        "verified": verify_record(record),
        "inputs": [(f, record.features.get(f.name)) for f in schema.features],
        "extra_inputs": sorted(set(record.features).difference(schema.feature_names)),
    }
    return render(request, "decision.html", context)


@router.get("/ui/decisions")
async def recent_page(
    request: Request,
    viewer: Reader,
    model: Annotated[str | None, Query(max_length=256)] = None,
    day: Annotated[date | None, Query()] = None,
    decision: Annotated[str | None, Query(max_length=64)] = None,
    before: Annotated[str | None, Query(max_length=256)] = None,
) -> Response:
    """Decisions of one model on one UTC day, newest first, a page at a time."""
    state = app_state(request)
    name = model or state.registry.default_name or ""
    shown_day = day or datetime.now(UTC).date()
    cursor = _cursor(before)
    wanted = decision or None
    await record_access(state, viewer.caller, Action.DECISION_LIST, f"{name}/{shown_day}")
    names = await state.store_guard.call(state.store.model_names)
    versions = sorted(version for version, of in names.items() if of == name)
    rows = await _newest(state, versions, shown_day, cursor, wanted)
    more = len(rows) > PAGE_ROWS
    rows = rows[:PAGE_ROWS]
    next_url = None
    if more:
        last = rows[-1]
        query = {"model": name, "day": shown_day.isoformat(), "before": _cursor_text(last)}
        if wanted:
            query["decision"] = wanted
        next_url = f"/ui/decisions?{urlencode(query)}"
    context = {
        "viewer": viewer,
        "rows": rows,
        "model": name,
        "models": sorted(set(names.values())),
        "day": shown_day,
        "decision": wanted,
        "next_url": next_url,
        "first_page": cursor is None,
    }
    return render(request, "decisions.html", context)


async def _newest(
    state: AppState,
    versions: list[str],
    day: date,
    cursor: DecisionCursor | None,
    decision: str | None,
) -> list[DecisionSummary]:
    # One more than a page, to know whether there is a next one; versions merged newest first.
    # Not through the store guard: its deadline is the hot path's (0.5 s in Cassandra), and a
    # day's page reads every bucket of it (~0.1 s on one node, more under load).
    pages = [
        await state.store.recent(version, day, PAGE_ROWS + 1, cursor, decision)
        for version in versions
    ]
    merged = heapq.merge(*pages, key=lambda row: (row.decided_at, row.transaction_id), reverse=True)
    return list(merged)[: PAGE_ROWS + 1]


def _cursor(text: str | None) -> DecisionCursor | None:
    # "MILLISECONDS~TRANSACTION_ID" of the last row of the page before.
    if not text:
        return None
    ms, separator, transaction_id = text.partition("~")
    try:
        at: datetime | None = EPOCH + timedelta(milliseconds=int(ms))
    except (ValueError, OverflowError):
        at = None
    if not separator or at is None:
        raise InvalidRequest(
            "The page cursor is not valid; start again from the first page.",
            [FieldProblem("before", "must be a cursor from a 'next page' link")],
        )
    return DecisionCursor(at, transaction_id)


def _cursor_text(row: DecisionSummary) -> str:
    return f"{(row.decided_at - EPOCH) // timedelta(milliseconds=1)}~{row.transaction_id}"


def _output_index(outputs: list[str | None], wanted: str | None) -> int:
    if wanted is None or wanted not in outputs:
        return 0
    return outputs.index(wanted)


def _own_axis(record: DecisionRecord, output: int) -> Axis:
    # Only for a model whose trees cannot be read: as wide as this decision's own path.
    base = record.base_value[output]
    reach = sum(abs(value) for value in record.attributions[output])
    return Axis(base - reach, base + reach)
