"""The one place errors become RFC 9457 `application/problem+json` answers."""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.errors import PROBLEM_BASE, FieldProblem, ServiceError

PROBLEM_MEDIA_TYPE = "application/problem+json"
log = logging.getLogger(__name__)

# Status codes Starlette raises itself (unknown route, wrong method), named for the client.
_HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    errors: Sequence[FieldProblem] = (),
    extra: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Build a problem+json response; `detail` must be safe to show a client."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [{"field": e.field, "reason": e.reason} for e in errors]
    if extra:
        body.update(extra)
    return Response(orjson.dumps(body), status, headers, media_type=PROBLEM_MEDIA_TYPE)


def _field_name(loc: Sequence[int | str]) -> str:
    # FastAPI prefixes the location ("body", "query", "path"); the client knows its field by name.
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _validation_problem(exc: RequestValidationError) -> Response:
    if any(e.get("type") == "json_invalid" for e in exc.errors()):
        # The location of a JSON syntax error is a character offset, not a field.
        reason = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in exc.errors())
        return problem_response(
            400,
            "malformed-json",
            "Malformed JSON",
            "The request body is not valid JSON.",
            [FieldProblem("body", reason)],
        )
    errors = [
        FieldProblem(_field_name(e.get("loc", ())), str(e.get("msg", ""))) for e in exc.errors()
    ]
    return problem_response(
        422, "invalid-request", "Invalid request", "The request does not match the API.", errors
    )


async def _on_service_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return problem_response(
        exc.status, exc.slug, exc.title, exc.detail, exc.errors, exc.extra, exc.response_headers()
    )


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return _validation_problem(exc)


async def _on_http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
    return problem_response(exc.status_code, slug, title, str(exc.detail), headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # The client gets no internal text; the log gets the stack trace.
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal", "Internal error", "An unexpected error occurred.")


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error through problem+json."""
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
