"""GET /v1/models: what this gateway serves."""

from fastapi import APIRouter
from pydantic import BaseModel

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


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    """Every served model with its active version and schema."""
    default = state.registry.default_name
    return ModelList(
        models=[
            ModelInfo(
                name=m.name, version=m.version, default=m.name == default, model_schema=m.schema
            )
            for m in state.registry.models()
        ]
    )
