"""GET /v1/models/{name}/versions/{version}/importance|drift|reasons: population figures of a
model version over a window of UTC days, from the stored aggregates (no record is read)."""

import math
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from service.api.auth import AUTH_RESPONSES, AuditExporter
from service.api.deps import AppState, Day, State
from service.core.population import report
from service.core.population.aggregates import Aggregate, Edges, merge_all
from service.core.population.drift import DriftRule, FeatureDrift
from service.core.population.reference import Reference
from service.core.records import ModelRef
from service.core.registry import LoadedModel
from service.errors import FieldProblem, InvalidRequest, NotFound

router = APIRouter(tags=["population"])

DEFAULT_DAYS = 7
PREFIX = "/v1/models/{name}/versions/{version}"
RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: {"description": "unknown model version, or (drift) no reference for it"},
}

Name = Annotated[str, Path(min_length=1, max_length=256)]
Version = Annotated[str, Path(min_length=1, max_length=128)]
Start = Annotated[
    Day | None,
    Query(description=f"First UTC day (default: {DEFAULT_DAYS - 1} days before `end`)."),
]
End = Annotated[Day | None, Query(description="Last UTC day, included (default: today).")]


class Window(BaseModel):
    start: date
    end: date


class ReferenceInfo(BaseModel):
    source: str
    decisions: int


class FeatureImportanceView(BaseModel):
    feature: str
    mean_abs: float
    mean: float
    std: float
    reference_mean_abs: float | None


class OutputImportanceView(BaseModel):
    output: str | None = Field(description="The class (multiclass models), else null.")
    features: list[FeatureImportanceView]


class ImportanceView(BaseModel):
    model: ModelRef
    window: Window
    decisions: int
    reference: ReferenceInfo | None
    outputs: list[OutputImportanceView]


class FeatureDriftView(BaseModel):
    feature: str
    n_reference: int
    n_current: int
    psi: float | None
    js: float | None
    ks: float | None
    ks_p_value: float | None
    drifting: bool


class OutputDriftView(BaseModel):
    output: str | None
    ndcg: float | None
    features: list[FeatureDriftView]


class InputDriftView(BaseModel):
    feature: str
    psi: float | None


class DriftFiguresView(BaseModel):
    decisions: int
    drifting: list[str]
    outputs: list[OutputDriftView]
    inputs: list[InputDriftView]


class DayDriftView(DriftFiguresView):
    day: date


class RuleView(BaseModel):
    min_decisions: int
    psi_threshold: float
    ks_alpha: float
    statement: str


class DriftView(BaseModel):
    model: ModelRef
    window: Window
    reference: ReferenceInfo
    rule: RuleView
    total: DriftFiguresView
    days: list[DayDriftView]


class ReasonDayView(BaseModel):
    day: date
    decisions: int
    outcomes: dict[str, int]
    denials: int
    families: dict[str, int]
    frequencies: dict[str, float]


class ReasonsView(BaseModel):
    model: ModelRef
    window: Window
    decisions: int
    denials: int
    families: dict[str, int]
    days: list[ReasonDayView]


RULE = DriftRule()
RULE_STATEMENT = (
    f"A feature drifts when at least {RULE.min_decisions} decisions are compared, its PSI is at "
    f"least {RULE.psi_threshold} and the KS test's p-value is below {RULE.ks_alpha} divided by "
    "the number of features (Bonferroni)."
)


@router.get(f"{PREFIX}/importance", response_model=ImportanceView, responses=RESPONSES)
async def get_importance(
    name: Name,
    version: Version,
    state: State,
    _: AuditExporter,
    start: Start = None,
    end: End = None,
) -> ImportanceView:
    """Global importance over the window: mean |phi|, mean phi and std per feature (per class
    for multiclass), largest first, beside the reference's mean |phi|."""
    model, window, days = await _window_days(state, name, version, start, end)
    reference = await report.reference_of(state.population, version)
    total = merge_all(days.values()) or Aggregate.empty(model.schema, _edges(model, reference))
    reference_rows = (
        {
            o.output: {f.feature: f.mean_abs for f in o.features}
            for o in report.importance(reference.aggregate, model.schema)
        }
        if reference is not None
        else {}
    )
    outputs = [
        OutputImportanceView(
            output=o.output,
            features=[
                FeatureImportanceView(
                    feature=f.feature,
                    mean_abs=f.mean_abs,
                    mean=f.mean,
                    std=f.std,
                    reference_mean_abs=reference_rows.get(o.output, {}).get(f.feature),
                )
                for f in o.features
            ],
        )
        for o in report.importance(total, model.schema)
    ]
    return ImportanceView(
        model=ModelRef(name=name, version=version),
        window=window,
        decisions=total.count,
        reference=_reference_info(reference),
        outputs=outputs,
    )


@router.get(f"{PREFIX}/drift", response_model=DriftView, responses=RESPONSES)
async def get_drift(
    name: Name,
    version: Version,
    state: State,
    _: AuditExporter,
    start: Start = None,
    end: End = None,
) -> DriftView:
    """Each feature's attribution drift against the version's reference (PSI, Jensen-Shannon
    distance, KS), the nDCG of the importance ranking, and the inputs' PSI (a data shift shows
    in both, a change of the model's logic only in the attributions): over the window (its days
    merged) and day by day."""
    model, window, days = await _window_days(state, name, version, start, end)
    reference = await report.reference_of(state.population, version)
    if reference is None:
        raise NotFound(
            f"Model {name!r} version {version} has no reference to compare with: give one with "
            "`shapstream model init ... --reference DATA.csv`, or freeze production days with "
            "`shapstream model freeze-reference`."
        )
    total = merge_all(days.values()) or Aggregate.empty(model.schema, reference.edges)
    return DriftView(
        model=ModelRef(name=name, version=version),
        window=window,
        reference=ReferenceInfo(source=reference.source, decisions=reference.aggregate.count),
        rule=RuleView(
            min_decisions=RULE.min_decisions,
            psi_threshold=RULE.psi_threshold,
            ks_alpha=RULE.ks_alpha,
            statement=RULE_STATEMENT,
        ),
        total=_figures(report.drift(total, reference, model.schema, RULE)),
        days=[
            DayDriftView(
                day=day, **_figures(report.drift(a, reference, model.schema, RULE)).model_dump()
            )
            for day, a in days.items()
        ],
    )


@router.get(f"{PREFIX}/reasons", response_model=ReasonsView, responses=RESPONSES)
async def get_reasons(
    name: Name,
    version: Version,
    state: State,
    _: AuditExporter,
    start: Start = None,
    end: End = None,
) -> ReasonsView:
    """Decisions by outcome and, among denials, how often each reason family was given, by
    day."""
    _model, window, days = await _window_days(state, name, version, start, end)
    rows = report.reasons(days)
    families: dict[str, int] = {}
    for row in rows:
        for family, count in row.families.items():
            families[family] = families.get(family, 0) + count
    return ReasonsView(
        model=ModelRef(name=name, version=version),
        window=window,
        decisions=sum(r.decisions for r in rows),
        denials=sum(r.denials for r in rows),
        families=dict(sorted(families.items())),
        days=[
            ReasonDayView(
                day=r.day,
                decisions=r.decisions,
                outcomes=r.outcomes,
                denials=r.denials,
                families=r.families,
                frequencies=r.frequencies,
            )
            for r in rows
        ],
    )


async def _window_days(
    state: AppState, name: str, version: str, start: date | None, end: date | None
) -> tuple[LoadedModel, Window, dict[date, Aggregate]]:
    """The version (404 unless it is `name`'s), the window asked for, its days' aggregates."""
    model = await _version(state, name, version)
    window = window_of(start, end)
    days = await report.daily(
        state.population, version, report.days_between(window.start, window.end)
    )
    return model, window, days


async def _version(state: AppState, name: str, version: str) -> LoadedModel:
    names = await state.store_guard.call(state.store.model_names)
    if names.get(version) != name:
        raise NotFound(f"Model {name!r} has no version {version!r}.")
    return await state.registry.get_version(version, state.store.get_model)


def window_of(start: date | None, end: date | None) -> Window:
    """The UTC days asked for (both included): the last 7 by default, at most 366; a 422
    naming `start` otherwise. The console's population page asks the same way."""
    last = end or datetime.now(UTC).date()
    try:
        first = start or last - timedelta(days=DEFAULT_DAYS - 1)
    except OverflowError:  # `end` within a week of the first day there is
        first = date.min
    if first > last:
        raise InvalidRequest(
            "The window ends before it starts.", [FieldProblem("start", "must not be after end")]
        )
    if (last - first).days + 1 > report.MAX_DAYS:
        raise InvalidRequest(
            f"The window is longer than {report.MAX_DAYS} days; ask for less.",
            [FieldProblem("start", f"at most {report.MAX_DAYS} days before end")],
        )
    return Window(start=first, end=last)


def _edges(model: LoadedModel, reference: Reference | None) -> Edges:
    return reference.edges if reference is not None else Edges.default(model.schema)


def _reference_info(reference: Reference | None) -> ReferenceInfo | None:
    if reference is None:
        return None
    return ReferenceInfo(source=reference.source, decisions=reference.aggregate.count)


def _number(value: float) -> float | None:
    # An empty side has no proportions: NaN, which JSON cannot carry.
    return None if math.isnan(value) else value


def _feature(f: FeatureDrift) -> FeatureDriftView:
    return FeatureDriftView(
        feature=f.feature,
        n_reference=f.n_reference,
        n_current=f.n_current,
        psi=_number(f.psi),
        js=_number(f.js),
        ks=_number(f.ks),
        ks_p_value=_number(f.ks_p_value),
        drifting=f.drifting,
    )


def _figures(figures: report.DriftFigures) -> DriftFiguresView:
    return DriftFiguresView(
        decisions=figures.decisions,
        drifting=figures.drifting,
        outputs=[
            OutputDriftView(
                output=o.output,
                ndcg=_number(o.ndcg),
                features=[_feature(f) for f in o.features],
            )
            for o in figures.outputs
        ],
        inputs=[InputDriftView(feature=i.feature, psi=_number(i.psi)) for i in figures.inputs],
    )
