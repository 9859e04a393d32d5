"""The OpenAPI document: FastAPI's, with this service's error bodies and, while the models are
served, each model's request schema and example.

Every 4xx and 5xx answer is `application/problem+json` (service/api/problems.py), so every error
response of the document says so, FastAPI's own 422 schema included; a 401 names its
`WWW-Authenticate` header, a 503 its `Retry-After`, and every /v1/ route lists the 503 of load
shedding. The request body of POST /v1/predictions is only known once the registry is open (in
the app's lifespan): until then the document shows its generic shape.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from fastapi import FastAPI
from pydantic import BaseModel

from service.api import predictions
from service.api.deps import JSON_MEDIA_TYPE
from service.api.problems import PROBLEM_MEDIA_TYPE, ForbiddenProblem, Problem
from service.core.registry import LoadedModel, ModelRegistry

REF_PREFIX: Final = "#/components/schemas/"
# FastAPI's own description of an error body, replaced by the problem schema.
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")
# The schema of an error status when its route declares none.
_SCHEMAS: Final[dict[str, type[BaseModel]]] = {"403": ForbiddenProblem}
_HEADERS: Final[dict[str, dict[str, Any]]] = {
    "401": {
        "WWW-Authenticate": {
            "description": "The scheme to authenticate with: `Bearer`.",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    "503": {
        "Retry-After": {
            "description": "Seconds to wait before retrying (spread, so that retries do not "
            "all come back at once).",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}
SHED: Final = (
    "the gateway is at its bound of concurrent requests, or a dependency did not answer in "
    "time: retry after Retry-After seconds"
)
INVALID: Final = "the request does not match the API: each refused field is named with the reason"


class ApiDocument:
    """`app.openapi`: the document, built once, and again for the models while they are served."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._base: dict[str, Any] | None = None
        self._registry: ModelRegistry | None = None
        self._served: dict[str, Any] | None = None

    def __call__(self) -> dict[str, Any]:
        if self._base is None:
            self._base = _with_problems(FastAPI.openapi(self._app))
        if self._registry is None:
            return self._base
        if self._served is None:
            self._served = _with_models(self._base, self._registry)
        return self._served

    @contextmanager
    def serving(self, registry: ModelRegistry) -> Iterator[None]:
        """Describe the models of `registry` while in this block (the app's lifespan)."""
        self._registry, self._served = registry, None
        try:
            yield
        finally:
            self._registry, self._served = None, None


def _with_models(base: dict[str, Any], registry: ModelRegistry) -> dict[str, Any]:
    document = copy.deepcopy(base)
    models = registry.models()
    if models:
        body = document["paths"][predictions.PATH]["post"]["requestBody"]
        body["content"][JSON_MEDIA_TYPE] = predictions.request_content(
            models, registry.default_name
        )
        if registry.default_name is not None:
            _version_examples(document, registry.active())
    return document


def _version_examples(document: dict[str, Any], model: LoadedModel) -> None:
    """The served default model's name and version as the example of a version's routes."""
    examples = {"name": model.name, "version": model.version}
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/models/{name}/versions/{version}/"):
            continue
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter["name"] in examples:
                    parameter["example"] = examples[parameter["name"]]


def _with_problems(generated: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(generated)
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    models: list[type[BaseModel]] = [Problem, *_SCHEMAS.values()]
    for model in models:
        _add_schema(schemas, model)
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            if path.startswith("/v1/"):
                responses.setdefault("503", {"description": SHED})
            for status, response in responses.items():
                if status[0] in "45":
                    _as_problem(status, response)
    for name in _FASTAPI_VALIDATION:
        schemas.pop(name, None)
    return document


def _as_problem(status: str, response: dict[str, Any]) -> None:
    declared = response.pop("content", {}).get(JSON_MEDIA_TYPE, {}).get("schema")
    if declared is None or declared.get("$ref", "").removeprefix(REF_PREFIX) in (
        _FASTAPI_VALIDATION
    ):
        declared = None
        if status == "422":
            response["description"] = INVALID
    model = _SCHEMAS.get(status, Problem)
    schema = declared or {"$ref": REF_PREFIX + model.__name__}
    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": schema}}
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]


def _add_schema(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=REF_PREFIX + "{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
