"""The explanation console: web pages for loan officers, compliance analysts and examiners.

Served by the gateway under /ui/ (GET / leads there): server-rendered pages, one style sheet
and one small script, all from this process. People sign in with an API key once and hold a
session cookie (session.py); each page checks the same scope as the API route it mirrors, and
each decision opened is in the access log under the key's name, as an API read is.
"""

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.responses import RedirectResponse, Response

from service.api.ui import decisions, models, notice, population, signin
from service.api.ui.pages import CONSOLE_KEY, error_page, make_console
from service.api.ui.session import CrossSiteRequest, SignInRequired, sign_in_redirect
from service.errors import Forbidden, ServiceError
from service.settings import ConsoleSettings

STATIC = "/ui/static"
UI_PREFIX = "/ui/"

Handler = Callable[[Request, Exception], Awaitable[Response]]


def install_console(app: FastAPI, settings: ConsoleSettings) -> None:
    """Serve the console's pages and assets, and render errors on its pages as pages."""
    setattr(app.state, CONSOLE_KEY, make_console(settings))
    app.add_api_route("/", _to_console, include_in_schema=False)
    app.add_api_route("/ui", _to_console, include_in_schema=False)
    app.add_api_route("/ui/", _to_decisions, include_in_schema=False)
    for router in (
        signin.router,
        decisions.router,
        notice.router,
        models.router,
        population.router,
    ):
        app.include_router(router)
    app.mount(STATIC, StaticFiles(packages=[("service.api.ui", "static")]), name="ui-static")
    _render_errors_as_pages(app)


async def _to_console() -> Response:
    return RedirectResponse("/ui/", status_code=307)


async def _to_decisions() -> Response:
    return RedirectResponse("/ui/decisions", status_code=307)


def _render_errors_as_pages(app: FastAPI) -> None:
    # The API's handlers answer problem+json; on a console page a person gets a page instead.
    for kind in (ServiceError, RequestValidationError):
        app.add_exception_handler(kind, _page_or_problem(app.exception_handlers[kind]))

    async def on_sign_in_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        return sign_in_redirect(request, exc.path)

    async def on_cross_site(request: Request, exc: Exception) -> Response:
        return error_page(request, Forbidden(f"Refused a request {exc}."))

    app.add_exception_handler(SignInRequired, on_sign_in_required)
    app.add_exception_handler(CrossSiteRequest, on_cross_site)


def _page_or_problem(api_handler: Callable[[Request, Exception], Any]) -> Handler:
    async def handler(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith(UI_PREFIX):
            return error_page(request, exc)
        answer: Response = await api_handler(request, exc)
        return answer

    return handler
