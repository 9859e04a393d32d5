"""GET /v1/models: what this gateway serves."""

from fastapi import APIRouter
from pydantic import BaseModel

from service.api.auth import UNAUTHORIZED_RESPONSES, AnyCaller
from service.api.deps import State
from service.core.schema import ModelSchema

router = APIRouter(tags=["models"])


class ModelInfo(BaseModel):
    name: str
    version: str
    default: bool
    model_schema: ModelSchema


class ModelList(BaseModel):
    models: list[ModelInfo]


# Any valid key, whatever its scopes: the schemas are what every client builds requests from,
# and they hold no decision data, but they are not for anonymous callers either.
@router.get("/v1/models", response_model=ModelList, responses=UNAUTHORIZED_RESPONSES)
async def list_models(state: State, _: AnyCaller) -> ModelList:
    """Every served model with its active version and schema (any valid API key)."""
    default = state.registry.default_name
    return ModelList(
        models=[
            ModelInfo(
                name=m.name, version=m.version, default=m.name == default, model_schema=m.schema
            )
            for m in state.registry.models()
        ]
    )
