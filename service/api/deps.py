"""What routes receive: the state the lifespan opened."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ValidationError
from starlette.requests import HTTPConnection

from service.api.json_keys import repeated_key, repeats_no_key
from service.core.breaker import Guard
from service.core.decisions import Decider
from service.core.denials import DenialLog
from service.core.keys import KeyVerifier
from service.core.ports import AccessStore, EventBus, ExplanationStore, PopulationStore
from service.core.registry import ModelRegistry
from service.errors import DuplicateKey, FieldProblem, UnsupportedMediaType
from service.metrics import Metrics
from service.settings import Settings

STATE_KEY = "shapstream"

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class AppState:
    settings: Settings
    registry: ModelRegistry
    bus: EventBus
    store: ExplanationStore
    metrics: Metrics
    access: AccessStore
    keys: KeyVerifier
    decider: Decider
    # Deadline and circuit breaker of the store calls made while a client waits.
    store_guard: Guard
    # Refused attempts, written to the access log in the background (service/core/denials.py).
    denials: DenialLog
    # Population aggregates and references (service/core/population).
    population: PopulationStore


def app_state(connection: HTTPConnection) -> AppState:
    """The state, read directly: for the hot path, where a dependency costs its solving."""
    state = getattr(connection.state, STATE_KEY)
    assert isinstance(state, AppState)
    return state


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in a thread pool, a hop per request.
    return app_state(request)


State = Annotated[AppState, Depends(get_state)]


def _not_a_number(expected: str) -> Callable[[Any], Any]:
    """A validator refusing a number (or numeric text) where `expected` is due."""

    def check(value: Any) -> Any:
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                return value
        if isinstance(value, str | int | float):
            raise ValueError(f"must be {expected}, not a number")
        return value

    return check


# A date as the OpenAPI document states it (YYYY-MM-DD): pydantic alone would also read a bare
# number as a Unix time.
Day = Annotated[date, BeforeValidator(_not_a_number("a date (YYYY-MM-DD)"))]

# A date-time as the OpenAPI document states it (RFC 3339, with a time zone): pydantic alone would
# also read a bare number ("0.5") as a Unix time.
DateTime = Annotated[
    AwareDatetime, BeforeValidator(_not_a_number("a date-time with a time zone (RFC 3339)"))
]


JSON_MEDIA_TYPE = "application/json"


async def json_body(request: Request) -> bytes:
    """The body of a request that must carry JSON; 415 unless its Content-Type says it does."""
    declared = request.headers.get("content-type", "")
    if declared.partition(";")[0].strip().lower() != JSON_MEDIA_TYPE:
        got = f"{declared[:64]!r}" if declared else "none"
        raise UnsupportedMediaType(
            f"The body must be JSON, sent with 'Content-Type: {JSON_MEDIA_TYPE}' (got {got}).",
            [FieldProblem("content-type", f"must be {JSON_MEDIA_TYPE}")],
        )
    return await request.body()


def parse_body(model: type[M], raw: bytes) -> M:
    """`raw` JSON validated as `model` in one pass (pydantic's own parser), with the errors
    FastAPI would report, so the problem handler answers exactly as for a declared body.

    A key repeated within an object is refused (400) rather than resolved (see json_keys).
    """
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        found = exc.errors(include_url=False)
        if all(e["type"] != "json_invalid" for e in found):
            _refuse_repeated_keys(raw)  # a repeat may be the cause: name it, not its effect
        errors = [{**e, "loc": ("body", *e["loc"])} for e in found]
        raise RequestValidationError(errors) from exc
    if not repeats_no_key(raw, body):
        _refuse_repeated_keys(raw)
    return body


def _refuse_repeated_keys(raw: bytes) -> None:
    key = repeated_key(raw)
    if key is not None:
        raise DuplicateKey(
            f"The key {key!r} appears more than once in one object; send each key once.",
            [FieldProblem(key, "repeated: a key may appear only once in an object")],
        )


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI `requestBody` of a route that parses `model` itself (see `parse_body`)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    return {
        "required": True,
        "content": {"application/json": {"schema": _inline(schema, definitions)}},
    }


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    # Local `#/$defs/...` references mean nothing inside an OpenAPI document: inline them.
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(definitions[ref.removeprefix("#/$defs/")], definitions)
        return {key: _inline(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    return node
