"""What every console page shares: the console's state, who is looking, rendering, errors.

Pages are Jinja2 templates rendered on the server (service/api/ui/templates) with one style
sheet and one small script, both served by this process: nothing is fetched from another
host, and the Content-Security-Policy sent with every page forbids it.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, Response

from service.api.auth import Caller, note_denial
from service.api.deps import app_state
from service.api.ui.session import COOKIE, Session, Sessions, SignInRequired
from service.core.access import Action, Scope
from service.core.formats.base import UnsupportedModel
from service.core.registry import LoadedModel
from service.core.waterfall import Axis, margin_bounds
from service.errors import Forbidden, ServiceError
from service.settings import ConsoleSettings

TEMPLATES = Path(__file__).parent / "templates"
CONSOLE_KEY = "console"

# Every page: its own origin only, no inline script, no frame of it on another site.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    # "no-referrer" would make a browser send `Origin: null` with the console's own forms.
    "referrer-policy": "same-origin",
    # Applicants' data: never kept in a browser's or proxy's cache.
    "cache-control": "no-store",
}


@dataclass
class Console:
    """The console's state, made by `install_console` with the app."""

    settings: ConsoleSettings
    sessions: Sessions
    templates: Environment
    # Fixed waterfall axes by model version (a version never changes).
    axes: dict[str, list[Axis] | None] = field(default_factory=dict)

    def axis(self, model: LoadedModel) -> list[Axis] | None:
        """The fixed axes of a version's outputs; None when its trees cannot be read."""
        if model.version not in self.axes:
            try:
                self.axes[model.version] = margin_bounds(model.forest())
            except UnsupportedModel:
                self.axes[model.version] = None
        return self.axes[model.version]


def make_console(settings: ConsoleSettings) -> Console:
    secret = settings.session_secret
    templates = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return Console(
        settings=settings,
        sessions=Sessions(
            secret.get_secret_value().encode() if secret is not None else None,
            settings.session_ttl_s,
        ),
        templates=templates,
    )


def console_of(request: Request) -> Console:
    console = getattr(request.app.state, CONSOLE_KEY)
    assert isinstance(console, Console)
    return console


@dataclass(frozen=True, slots=True)
class Viewer:
    """A signed-in person: the key's name and scopes, and the session's sign-out token."""

    caller: Caller
    session: Session
    csrf: str


async def viewer_of(request: Request, scope: Scope) -> Viewer:
    """The signed-in person, if their key still holds `scope`; else sign-in, or a 403 page."""
    console = console_of(request)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    session = console.sessions.read(request.cookies.get(COOKIE))
    if session is None:
        raise SignInRequired(target)
    state = app_state(request)
    stored = await state.keys.verify_hash(session.key_hash)
    if stored is None:
        raise SignInRequired(target)
    if scope not in stored.scopes:
        note_denial(state, request, Action.DENIED_FORBIDDEN, stored.name, f"lacks {scope}")
        raise Forbidden(
            f"The API key {stored.name!r} you signed in with lacks the scope {scope.value!r} "
            "this page needs. Sign in with a key that has it.",
            extra={"missing_scope": scope.value},
        )
    caller = Caller(stored.name, stored.scopes)
    return Viewer(caller, session, console.sessions.csrf_token(session))


def require_viewer(scope: Scope) -> Any:
    """A dependency giving the `Viewer` of a page that needs `scope`."""

    async def dependency(request: Request) -> Viewer:
        return await viewer_of(request, scope)

    return Depends(dependency)


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """A page, with the security headers every page carries."""
    console = console_of(request)
    page = console.templates.get_template(template).render(
        root=request.scope.get("root_path", ""), **context
    )
    return HTMLResponse(page, status_code, headers={**SECURITY_HEADERS, **(headers or {})})


def error_page(request: Request, exc: Exception) -> Response:
    """A service error on a console page, as a page (the API answers problem+json)."""
    headers: dict[str, str] = {}
    if isinstance(exc, RequestValidationError):
        status, title = 422, "Invalid request"
        detail = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'][1:])}: {error['msg']}"
            for error in exc.errors()
        )
    elif isinstance(exc, ServiceError):
        status, title, detail = exc.status, exc.title, exc.detail
        headers = dict(exc.response_headers())
    else:
        raise exc
    if status == 403:
        title = "Not allowed"
    return render(
        request,
        "error.html",
        {"title": title, "status": status, "detail": detail, "viewer": None},
        status_code=status,
        headers=headers,
    )
