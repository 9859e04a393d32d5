"""POST /v1/predictions: score, publish, answer."""

import copy
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Final

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.responses import Response

from service.api.auth import AUTH_RESPONSES, SECURITY, authorize
from service.api.deps import JSON_MEDIA_TYPE, app_state, body_schema, json_body, parse_body
from service.api.middleware import ARRIVED, BUSY
from service.api.problems import PredictionUnavailable
from service.core.access import Scope
from service.core.records import DecisionResponse
from service.core.registry import LoadedModel
from service.core.schema import Feature, FeatureType, ModelSchema
from service.errors import Overloaded

router = APIRouter(tags=["predictions"])

PATH: Final = "/v1/predictions"
TRANSACTION_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
# The registry refuses numbers a float32 cannot hold (service/core/registry.py).
_F32_MAX: Final = 3.4028234663852886e38

TransactionId = Annotated[str, Field(min_length=1, max_length=128, pattern=TRANSACTION_ID_PATTERN)]


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: dict[str, JsonValue] = Field(
        description="The applicant: every feature of the model's schema by name (see "
        "GET /v1/models), null marking a missing value."
    )
    transaction_id: TransactionId | None = Field(
        default=None,
        description="Optional: your id for this decision. A retry with the same id and the same "
        "body gets the first answer, byte for byte, and is never decided twice; the same id with "
        "another body gets a 409. Send one whenever you may retry (after a 503 or a timeout). "
        "Without it the service assigns one, returned in the answer: the explanation is read "
        "under that id.",
    )
    model: str | None = Field(
        default=None,
        description="Optional: the name of a served model (GET /v1/models); the default one if "
        "omitted.",
    )


@router.post(
    PATH,
    response_model=DecisionResponse,
    openapi_extra={"security": SECURITY, "requestBody": body_schema(PredictionRequest)},
    responses={
        **AUTH_RESPONSES,
        200: {
            "description": "The decision, durable: its explanation will be stored under its "
            "transaction_id.",
            "links": {
                "GetExplanation": {
                    "operationRef": "#/paths/~1v1~1explanations~1{transaction_id}/get",
                    "parameters": {"transaction_id": "$response.body#/transaction_id"},
                    "description": "The decision's explanation, once a worker has stored it.",
                }
            },
        },
        400: {"description": "the body is not valid JSON, or repeats a key within an object"},
        409: {"description": "transaction_id already used for a different request"},
        413: {"description": "the body is larger than the gateway accepts (64 KiB by default)"},
        415: {"description": f"the body is not declared as JSON (Content-Type: {JSON_MEDIA_TYPE})"},
        422: {
            "description": "the request does not match the API or the model's schema: each "
            "refused field is named"
        },
        503: {
            "model": PredictionUnavailable,
            "description": "overloaded, or a dependency did not answer in time; retry after "
            "Retry-After seconds with the same transaction_id (it is never decided twice)",
        },
    },
)
async def predict(request: Request) -> Response:
    """Score the features with the model and answer once the decision is durable (acknowledged by
    Kafka, or in the gateway's spool); its exact TreeSHAP explanation is then stored under its
    transaction_id. Send the body as `Content-Type: application/json`, each key once."""
    # The key is checked and the body parsed here, not declared as dependencies: FastAPI's
    # solving of those costs more than deciding (~120 us a request, measured); the OpenAPI
    # document still shows both.
    await authorize(request, Scope.PREDICT)
    state = app_state(request)
    body = parse_body(PredictionRequest, await json_body(request))
    if request.scope.get(BUSY) and await request.is_disconnected():
        # Its client gave up while the request waited its turn: nobody would read the answer.
        state.metrics.shed.labels(reason="client-gone").inc()
        raise Overloaded("The client disconnected before the decision was made.")
    answer = await state.decider.decide(
        body.features, body.model, body.transaction_id, request.scope.get(ARRIVED)
    )
    # Bytes as first answered (orjson); FastAPI would validate and encode the model again.
    return Response(answer, media_type="application/json")


def request_content(models: Sequence[LoadedModel], default: str | None) -> dict[str, Any]:
    """The request body's OpenAPI media type for the served models: each one's exact schema (its
    features, their types, categories and ranges) and an example built from it."""
    generic = body_schema(PredictionRequest)["content"][JSON_MEDIA_TYPE]["schema"]
    bodies = [_request_schema(generic, m.schema, m.name == default) for m in models]
    examples = {
        m.name: {
            "summary": f"{m.name}{' (the default model)' if m.name == default else ''}",
            "value": _example(m.schema, m.name == default),
        }
        for m in models
    }
    schema = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
    return {"schema": schema, "examples": examples}


def _request_schema(generic: dict[str, Any], schema: ModelSchema, default: bool) -> dict[str, Any]:
    properties = copy.deepcopy(generic["properties"])
    properties["features"] = {
        "description": properties["features"]["description"],
        "type": "object",
        "properties": {f.name: _feature_schema(f) for f in schema.features},
        "required": schema.feature_names,
        "additionalProperties": False,
    }
    name = {"const": schema.name}
    model = {"anyOf": [name, {"type": "null"}]} if default else name
    properties["model"] = {**model, "description": properties["model"]["description"]}
    return {
        "title": f"PredictionRequest ({schema.name})",
        "type": "object",
        "properties": properties,
        "required": ["features"] if default else ["features", "model"],
        "additionalProperties": False,
    }


def _feature_schema(feature: Feature) -> dict[str, Any]:
    value: dict[str, Any]
    if feature.type is FeatureType.CATEGORICAL:
        value = {"type": "string", "enum": list(feature.categories)}
    else:
        low = -_F32_MAX if feature.minimum is None else feature.minimum
        high = _F32_MAX if feature.maximum is None else feature.maximum
        value = {"type": "number", "minimum": low, "maximum": high}
    if feature.nullable:
        value = {"anyOf": [value, {"type": "null"}]}
    if feature.description:
        value["description"] = feature.description
    return value


def _example(schema: ModelSchema, default: bool) -> dict[str, Any]:
    txn = re.sub(r"[^A-Za-z0-9._:-]", "-", f"example-{schema.name}-0001")[:128]
    body: dict[str, Any] = {
        "transaction_id": txn,
        "features": {f.name: _example_value(f) for f in schema.features},
    }
    if not default:
        body["model"] = schema.name
    return body


def _example_value(feature: Feature) -> str | float:
    if feature.type is FeatureType.CATEGORICAL:
        return feature.categories[0]
    low, high = feature.minimum, feature.maximum
    if low is not None and high is not None:
        middle = (low + high) / 2
        # Whole-number ranges (counts, months, amounts) get a whole number.
        return math.floor(middle) if low.is_integer() and high.is_integer() else middle
    return low if low is not None else high if high is not None else 0
