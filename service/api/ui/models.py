"""Console pages of models: what is served, and each version's schema."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from service.api.deps import app_state
from service.api.ui.decisions import Reader
from service.api.ui.pages import render
from service.errors import NotFound

router = APIRouter(include_in_schema=False)


@router.get("/ui/models")
async def models_page(request: Request, viewer: Reader) -> Response:
    """The served models, each with its active version."""
    state = app_state(request)
    context = {
        "viewer": viewer,
        "models": state.registry.models(),
        "default": state.registry.default_name,
    }
    return render(request, "models.html", context)


@router.get("/ui/models/{name}")
async def model_page(
    request: Request,
    viewer: Reader,
    name: Annotated[str, Path(min_length=1, max_length=256)],
    version: Annotated[str | None, Query(max_length=128)] = None,
) -> Response:
    """A model's versions (every one stored, the served one marked) and one version's schema."""
    state = app_state(request)
    names = await state.store_guard.call(state.store.model_names)
    served = next((m for m in state.registry.models() if m.name == name), None)
    versions = sorted(v for v, of in names.items() if of == name)
    if served is not None and served.version not in versions:
        versions.append(served.version)
    if not versions:
        raise NotFound(f"No model named {name!r} is served or stored.")
    shown = version or (served.version if served is not None else versions[-1])
    if shown not in versions:
        raise NotFound(f"Model {name!r} has no version {shown!r}.")
    model = await state.registry.get_version(shown, state.store.get_model)
    families = {family.name: family for family in model.schema.families}
    context = {
        "viewer": viewer,
        "name": name,
        "versions": versions,
        "served": served.version if served is not None else None,
        "model": model,
        "schema": model.schema,
        "families": families,
    }
    return render(request, "model.html", context)
