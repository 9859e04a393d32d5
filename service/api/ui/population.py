"""The console's population page of a model version: what drives its decisions (global
importance, the attributions' histograms), what changed since its reference (drift), and which
reasons its denials gave, day by day.

The same figures as GET /v1/models/{name}/versions/{version}/importance|drift|reasons, from the
same stored aggregates (one read of the window's days, one of the reference), under the same
scope (audit:export) and window rules; no record is read.
"""

import math
from dataclasses import dataclass
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from service.api import population as population_api
from service.api.deps import AppState, app_state
from service.api.ui.pages import Viewer, render, require_viewer
from service.api.ui.population_charts import (
    CountRow,
    EdgeRow,
    importance_chart,
    reason_charts,
    swarm_chart,
)
from service.core.access import Scope
from service.core.population import report
from service.core.population.aggregates import Aggregate, Edges, merge_all
from service.core.population.drift import FeatureDrift
from service.core.population.reference import Reference
from service.core.registry import LoadedModel
from service.core.schema import ModelSchema
from service.core.waterfall import output_names
from service.errors import NotFound

router = APIRouter(include_in_schema=False)

Exporter = Annotated[Viewer, require_viewer(Scope.AUDIT_EXPORT)]


@dataclass(frozen=True, slots=True)
class DriftRow:
    """A feature's line of the drift table (of the class shown)."""

    figures: FeatureDrift
    input_psi: float

    @property
    def feature(self) -> str:
        return self.figures.feature


@dataclass(frozen=True, slots=True)
class DriftTable:
    ndcg: float
    # Flagged features first, then by PSI, largest first.
    rows: list[DriftRow]
    # Every feature drifting in any class (the API's `drifting`).
    drifting: list[str]


@router.get("/ui/models/{name}/population")
async def population_page(
    request: Request,
    viewer: Exporter,
    name: Annotated[str, Path(min_length=1, max_length=256)],
    version: Annotated[str | None, Query(max_length=128)] = None,
    start: Annotated[date | None, Query()] = None,
    end: Annotated[date | None, Query()] = None,
    output: Annotated[str | None, Query(alias="class", max_length=256)] = None,
) -> Response:
    """A version's importance, attribution histograms, drift and reason frequencies over a
    window of UTC days (both included; by default the last 7)."""
    state = app_state(request)
    window = population_api.window_of(start, end)
    versions, served = await _versions(state, name)
    shown = version or served or versions[-1]
    if shown not in versions:
        raise NotFound(f"Model {name!r} has no version {shown!r}.")
    model = await state.registry.get_version(shown, state.store.get_model)
    schema = model.schema
    days = await report.daily(
        state.population, shown, report.days_between(window.start, window.end)
    )
    reference = await report.reference_of(state.population, shown)
    total = merge_all(days.values()) or Aggregate.empty(schema, _edges_of_new(model, reference))
    outputs = output_names(schema)
    index = outputs.index(output) if output in outputs else 0

    ranked = report.importance(total, schema)[index]
    reference_importance = (
        {
            f.feature: f.mean_abs
            for f in report.importance(reference.aggregate, schema)[index].features
        }
        if reference is not None
        else None
    )
    features = [f.feature for f in ranked.features]
    edges = _edges_of(total, reference, schema)
    swarm = None
    if edges is not None:
        columns = {f.name: i for i, f in enumerate(schema.features)}
        same_bins = reference is not None and reference.aggregate.edges == total.edges
        swarm = swarm_chart(
            features,
            _by_feature(total.hist[index], columns),
            _by_feature(reference.aggregate.hist[index], columns)
            if reference is not None and same_bins
            else None,
            {name: _edge_row(edges, index, column) for name, column in columns.items()},
        )

    drift, drift_problem = None, None
    if reference is not None:
        try:
            drift = _drift_table(total, reference, schema, index)
        except ValueError:
            drift_problem = (
                "The window's decisions were binned on other edges than the reference's, so "
                "they cannot be compared bin for bin."
            )

    rows = report.reasons(days)
    reason_texts = {family.name: family.reason for family in schema.families}
    given = {family for row in rows for family in row.families}
    context = {
        "viewer": viewer,
        "name": name,
        "model": model,
        "schema": schema,
        "versions": versions,
        "served": served,
        "window": window,
        "max_days": report.MAX_DAYS,
        "outputs": outputs,
        "selected": outputs[index],
        "decisions": total.count,
        "denials": total.denials,
        "binary": schema.decision is not None and schema.outputs == 1,
        "reference": reference,
        "importance": importance_chart(ranked.features, reference_importance),
        "ranked": ranked.features,
        "reference_importance": reference_importance or {},
        "swarm": swarm,
        "drift": drift,
        "drift_problem": drift_problem,
        "rule": population_api.RULE,
        "rule_statement": population_api.RULE_STATEMENT,
        "reasons": rows,
        "reason_charts": reason_charts(
            report.days_between(window.start, window.end), rows, reason_texts
        ),
        "families": sorted(given),
        "never_given": [f.name for f in schema.families if f.name not in given],
    }
    return render(request, "population.html", context)


async def _versions(state: AppState, name: str) -> tuple[list[str], str | None]:
    # As the model page: every stored version of the model, and the one served.
    names = await state.store_guard.call(state.store.model_names)
    served = next((m.version for m in state.registry.models() if m.name == name), None)
    versions = sorted(v for v, of in names.items() if of == name)
    if served is not None and served not in versions:
        versions.append(served)
    if not versions:
        raise NotFound(f"No model named {name!r} is served or stored.")
    return versions, served


def _edges_of_new(model: LoadedModel, reference: Reference | None) -> Edges:
    # The edges a version's first decisions are binned on (as the API's empty window).
    return reference.edges if reference is not None else Edges.default(model.schema)


def _edges_of(total: Aggregate, reference: Reference | None, schema: ModelSchema) -> Edges | None:
    # An aggregate names its edges by fingerprint: the reference's, or the default grid.
    for edges in (reference.edges if reference is not None else None, Edges.default(schema)):
        if edges is not None and edges.fingerprint == total.edges:
            return edges
    return None


def _edge_row(edges: Edges, output: int, column: int) -> EdgeRow:
    return edges.attributions[output][column]


def _by_feature(hist: CountRow, columns: dict[str, int]) -> dict[str, CountRow]:
    return {name: hist[column] for name, column in columns.items()}


def _drift_table(
    total: Aggregate, reference: Reference, schema: ModelSchema, output: int
) -> DriftTable:
    figures = report.drift(total, reference, schema, population_api.RULE)
    shown = figures.outputs[output]
    inputs = {i.feature: i.psi for i in figures.inputs}
    rows = [DriftRow(f, inputs[f.feature]) for f in shown.features]
    rows.sort(
        key=lambda r: (
            not r.figures.drifting,
            math.isnan(r.figures.psi),
            -r.figures.psi if not math.isnan(r.figures.psi) else 0.0,
            r.feature,
        )
    )
    return DriftTable(shown.ndcg, rows, figures.drifting)
