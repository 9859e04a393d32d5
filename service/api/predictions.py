"""POST /v1/predictions: score, publish, answer."""

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.responses import Response

from service.api.auth import AUTH_RESPONSES, SECURITY, authorize
from service.api.deps import app_state, body_schema, parse_body
from service.api.middleware import ARRIVED, BUSY
from service.core.access import Scope
from service.core.records import DecisionResponse
from service.errors import Overloaded

router = APIRouter(tags=["predictions"])

TransactionId = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
]


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: dict[str, JsonValue] = Field(
        description="Every feature of the model's schema; null marks a missing value."
    )
    transaction_id: TransactionId | None = Field(
        default=None, description="Your id; the same id never yields two decisions."
    )
    model: str | None = Field(default=None, description="Model name; the default if omitted.")


@router.post(
    "/v1/predictions",
    response_model=DecisionResponse,
    openapi_extra={"security": SECURITY, "requestBody": body_schema(PredictionRequest)},
    responses={
        **AUTH_RESPONSES,
        409: {"description": "transaction_id reused for a different request"},
        422: {"description": "invalid features"},
        503: {
            "description": "overloaded, or a dependency did not answer in time; retry after "
            "Retry-After seconds with the same transaction_id (it is never decided twice)"
        },
    },
)
async def predict(request: Request) -> Response:
    """Decide, and guarantee the decision's explanation will be stored."""
    # The key is checked and the body parsed here, not declared as dependencies: FastAPI's
    # solving of those costs more than deciding (~120 us a request, measured); the OpenAPI
    # document still shows both.
    await authorize(request, Scope.PREDICT)
    state = app_state(request)
    body = parse_body(PredictionRequest, await request.body())
    if request.scope.get(BUSY) and await request.is_disconnected():
        # Its client gave up while the request waited its turn: nobody would read the answer.
        state.metrics.shed.labels(reason="client-gone").inc()
        raise Overloaded("The client disconnected before the decision was made.")
    answer = await state.decider.decide(
        body.features, body.model, body.transaction_id, request.scope.get(ARRIVED)
    )
    # Bytes as first answered (orjson); FastAPI would validate and encode the model again.
    return Response(answer, media_type="application/json")
