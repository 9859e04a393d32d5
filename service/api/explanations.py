"""GET /v1/explanations/{transaction_id}: the stored explanation of one decision."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import HTMLResponse

from service.api.auth import AUTH_RESPONSES, ExplanationReader, note_denial, record_access
from service.api.deps import State
from service.api.middleware import WAITED
from service.api.ui.notice import notice_page
from service.core.access import Action
from service.core.lookup import wait_for_record
from service.core.views import ExplanationView, explanation_view
from service.errors import NotFound

router = APIRouter(tags=["explanations"])

MAX_WAIT_S = 10.0


@router.get(
    "/v1/explanations/{transaction_id}",
    response_model=ExplanationView,
    responses={**AUTH_RESPONSES, 404: {"description": "unknown, or not explained yet"}},
)
async def get_explanation(
    transaction_id: Annotated[str, Path(min_length=1, max_length=128)],
    request: Request,
    state: State,
    caller: ExplanationReader,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait for the explanation.")
    ] = 0.0,
) -> ExplanationView:
    """The exact TreeSHAP explanation stored for a transaction."""
    record, waited_s = await wait_for_record(state.store, transaction_id, wait)
    if waited_s:
        # Waiting is what the client asked for, not work: kept out of the request's latency.
        request.scope[WAITED] = waited_s
        outcome = "not-found" if record is None else "found"
        state.metrics.explanation_wait_seconds.labels(outcome=outcome).observe(waited_s)
    if record is None:
        # A miss discloses nothing, but it may be a probe for transaction ids: noted, in the
        # background (it is no read that must not go unlogged).
        note_denial(state, request, Action.DENIED_NOT_FOUND, caller.name)
        raise NotFound(f"No explanation for transaction {transaction_id!r} (yet).")
    # A read that discloses a record is logged before the answer leaves: if the log cannot be
    # written, the read fails.
    await record_access(state, caller, Action.EXPLANATION_READ, transaction_id)
    model = await state.registry.get_version(record.model.version, state.store.get_model)
    return explanation_view(record, model.schema)


@router.get(
    "/v1/explanations/{transaction_id}/notice",
    response_class=HTMLResponse,
    responses={
        **AUTH_RESPONSES,
        200: {"content": {"text/html": {}}, "description": "the notice, as HTML"},
        404: {"description": "unknown, or not explained yet"},
    },
)
async def get_notice(
    transaction_id: Annotated[str, Path(min_length=1, max_length=128)],
    request: Request,
    state: State,
    caller: ExplanationReader,
) -> HTMLResponse:
    """The adverse-action notice of a decision as HTML (the console's printable letter).

    For a denial: the statement of principal reasons from the stored record, the ECOA notice,
    the lender's name and address. For an approval: that no adverse action was taken.
    """
    record = await state.store.get(transaction_id)
    if record is None:
        note_denial(state, request, Action.DENIED_NOT_FOUND, caller.name)
        raise NotFound(f"No explanation for transaction {transaction_id!r} (yet).")
    await record_access(state, caller, Action.EXPLANATION_READ, transaction_id)
    return notice_page(request, record, None)
