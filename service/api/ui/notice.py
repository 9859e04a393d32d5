"""The adverse-action notice of a decision: a printable console page, and the same letter from
the API (GET /v1/explanations/{transaction_id}/notice) for systems that mail it."""

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, Response

from service.api.ui.decisions import Reader, TransactionId, opened_record
from service.api.ui.pages import Viewer, console_of, render
from service.core.notice import Lender, notice
from service.core.records import DecisionRecord

router = APIRouter(include_in_schema=False)


def notice_page(request: Request, record: DecisionRecord, viewer: Viewer | None) -> HTMLResponse:
    """The letter of `record`; `viewer` None renders it without the console's header."""
    settings = console_of(request).settings
    lender = Lender(settings.lender_name, settings.lender_address, settings.regulator)
    return render(request, "notice.html", {"notice": notice(record, lender), "viewer": viewer})


@router.get("/ui/decisions/{transaction_id}/notice")
async def notice_in_console(
    request: Request, viewer: Reader, transaction_id: TransactionId
) -> Response:
    record, _ = await opened_record(request, viewer, transaction_id)
    return notice_page(request, record, viewer)
