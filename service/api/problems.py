"""The one place errors become RFC 9457 `application/problem+json` answers."""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema
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
    for name, value in (extra or {}).items():
        # Extension members never replace the standard ones (RFC 9457 section 3.2).
        body.setdefault(name, value)
    return Response(_encode(body), status, headers, media_type=PROBLEM_MEDIA_TYPE)


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        # A string echoed from the request (a field name, an id) may hold a lone surrogate,
        # which UTF-8 cannot encode: it goes back escaped, as the client would have written it.
        return orjson.dumps(_encodable(body))


def _encodable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return value


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


class ProblemField(BaseModel):
    field: str = Field(
        description="The field, dotted when nested (`features.age_in_years`), `body` for the "
        "whole body, or the query parameter or header's name."
    )
    reason: str = Field(description="Why it was refused, for a person to read.")


class Problem(BaseModel):
    """An error (RFC 9457 problem details); invalid input names each field and why."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A URI naming the kind of problem: stable, for programs.")
    title: str = Field(description="The kind of problem, for people.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What happened to this request.")
    errors: list[ProblemField] = Field(
        default=[], description="Each refused field and why (invalid requests)."
    )


class ForbiddenProblem(Problem):
    """A valid API key without the scope the route needs."""

    missing_scope: str = Field(description="The scope the key lacks.")


class PredictionUnavailable(Problem):
    """The decision could not be made or made durable in time; retrying is safe."""

    transaction_id: str | SkipJsonSchema[None] = Field(
        default=None,
        description="Set once the decision was under way: retry with this transaction_id (yours, "
        "or the one the service assigned), and it is never decided twice.",
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error through problem+json."""
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
