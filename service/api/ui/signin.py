"""Signing in to the console with an API key, and signing out."""

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import RedirectResponse, Response

from service.api.auth import note_denial
from service.api.deps import app_state
from service.api.ui.pages import console_of, render
from service.api.ui.session import (
    COOKIE,
    SIGN_IN,
    check_same_origin,
    clear_cookie,
    safe_next,
    set_cookie,
)
from service.core.access import MAX_KEY_LENGTH, NO_VALID_KEY, Action

router = APIRouter(include_in_schema=False)


@router.get(SIGN_IN)
async def sign_in_page(
    request: Request, next: Annotated[str | None, Query(max_length=2048)] = None
) -> Response:
    return render(request, "sign_in.html", {"next": safe_next(next), "error": None, "viewer": None})


@router.post(SIGN_IN)
async def sign_in(
    request: Request,
    api_key: Annotated[str, Form(max_length=MAX_KEY_LENGTH)] = "",
    next: Annotated[str | None, Form(max_length=2048)] = None,
) -> Response:
    """A valid key opens a session and goes on to `next`; anything else gets the form again."""
    check_same_origin(request)
    state = app_state(request)
    target = safe_next(next)
    stored = await state.keys.verify(api_key.strip())
    if stored is None:
        note_denial(state, request, Action.DENIED_UNAUTHENTICATED, NO_VALID_KEY, "console")
        context = {"next": target, "error": "That API key is not valid.", "viewer": None}
        return render(request, "sign_in.html", context, status_code=401)
    sessions = console_of(request).sessions
    response = RedirectResponse(target, status_code=303)
    set_cookie(response, request, sessions.issue(api_key.strip()), sessions.ttl_s)
    return response


@router.post("/ui/sign-out")
async def sign_out(request: Request, csrf: Annotated[str, Form(max_length=256)] = "") -> Response:
    """Ends the session of a page that proves it belongs to it (its sign-out token)."""
    check_same_origin(request)
    sessions = console_of(request).sessions
    session = sessions.read(request.cookies.get(COOKIE))
    if session is not None and not sessions.check_csrf(session, csrf):
        return render(
            request,
            "error.html",
            {
                "title": "Not allowed",
                "status": 403,
                "detail": "Sign out from the console's own page.",
                "viewer": None,
            },
            status_code=403,
        )
    response = RedirectResponse(SIGN_IN, status_code=303)
    clear_cookie(response, request)
    return response
