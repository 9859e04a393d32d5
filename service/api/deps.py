"""What routes receive: the state the lifespan opened."""

from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import HTTPConnection

from service.core.breaker import Guard
from service.core.decisions import Decider
from service.core.keys import KeyVerifier
from service.core.registry import ModelRegistry
from service.metrics import Metrics
from service.ports import AccessStore, EventBus, ExplanationStore
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


def app_state(connection: HTTPConnection) -> AppState:
    """The state, read directly: for the hot path, where a dependency costs its solving."""
    state = getattr(connection.state, STATE_KEY)
    assert isinstance(state, AppState)
    return state


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in a thread pool, a hop per request.
    return app_state(request)


State = Annotated[AppState, Depends(get_state)]


def parse_body(model: type[M], raw: bytes) -> M:
    """`raw` JSON validated as `model` in one pass (pydantic's own parser), with the errors
    FastAPI would report, so the problem handler answers exactly as for a declared body."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from exc


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
