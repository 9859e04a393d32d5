"""/docs (Swagger UI) and /redoc (ReDoc), every asset served by this process: no CDN.

The scripts, styles and images come from the `fastapi-standalone-docs` package (Swagger UI and
ReDoc as published, ReDoc's logo made local, pinned in pyproject.toml); the pages are FastAPI's
own, pointed at them. So the docs work on a closed network and no request leaves the machine.
"""

from typing import Final

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

ASSETS_PACKAGE: Final = "fastapi_standalone_docs"
SWAGGER_ASSETS: Final = "/docs/swagger"
FAVICON_ASSETS: Final = "/docs/fastapi"
# That package's ReDoc loads its logo from `<page path>/logo-mini.svg`.
REDOC_ASSETS: Final = "/redoc"

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over this service's OpenAPI document."""
    root, app = request.scope.get("root_path", ""), request.app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}{SWAGGER_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{FAVICON_ASSETS}/favicon.png",
        # No badge asking validator.swagger.io about the document.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc over this service's OpenAPI document."""
    root, app = request.scope.get("root_path", ""), request.app
    return get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{REDOC_ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{FAVICON_ASSETS}/favicon.png",
        with_google_fonts=False,
    )


def install_docs(app: FastAPI) -> None:
    """Serve the two pages and their assets (the app is made with docs_url=redoc_url=None)."""
    app.include_router(router)
    for path, directory in (
        (SWAGGER_ASSETS, "static/swagger"),
        (FAVICON_ASSETS, "static/fastapi"),
        (REDOC_ASSETS, "static/redoc"),
    ):
        app.mount(path, StaticFiles(packages=[(ASSETS_PACKAGE, directory)]))
