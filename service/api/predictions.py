"""POST /v1/predictions: score, publish, answer."""

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.responses import Response

from service.api.auth import AUTH_RESPONSES, require_scope
from service.api.deps import State
from service.core.access import Scope
from service.core.decisions import DecisionResponse
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
    dependencies=[require_scope(Scope.PREDICT)],
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
async def predict(body: PredictionRequest, state: State, request: Request) -> Response:
    """Decide, and guarantee the decision's explanation will be stored."""
    if await request.is_disconnected():
        # Its client gave up while the request waited its turn: nobody would read the answer.
        state.metrics.shed.labels(reason="client-gone").inc()
        raise Overloaded("The client disconnected before the decision was made.")
    answer = await state.decider.decide(body.features, body.model, body.transaction_id)
    # Bytes as first answered (orjson); FastAPI would validate and encode the model again.
    return Response(answer, media_type="application/json")
