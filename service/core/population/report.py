"""The three population questions, answered from stored aggregates (no record is read):
what drives decisions (importance), what changed since the reference (drift), and which
reasons are sent (reason frequencies among denials).

A window of days is the merge of its days' aggregates; a day is the merge of its parts (one
per source). Versions are never compared with each other: a version's figures are against its
own reference only.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from service.core.population.aggregates import Aggregate, merge_all
from service.core.population.drift import DriftRule, FeatureDrift, compare_all, ndcg, psi_all
from service.core.population.reference import Reference
from service.core.ports import PopulationStore
from service.core.schema import ModelSchema
from service.core.waterfall import output_names

# The longest window a query may ask for: a year of days, each one partition read.
MAX_DAYS = 366


def days_between(start: date, end: date) -> list[date]:
    """The days from `start` to `end`, both included."""
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


async def daily(
    store: PopulationStore, version: str, days: Sequence[date]
) -> dict[date, Aggregate]:
    """Each day's aggregate (days without decisions left out)."""
    by_day: dict[date, list[Aggregate]] = {}
    for part in await store.parts(version, days):
        by_day.setdefault(part.day, []).append(Aggregate.from_bytes(part.aggregate))
    merged = {day: merge_all(parts) for day, parts in sorted(by_day.items())}
    return {day: aggregate for day, aggregate in merged.items() if aggregate is not None}


async def reference_of(store: PopulationStore, version: str) -> Reference | None:
    stored = await store.get_reference(version)
    return None if stored is None else Reference.from_bytes(stored)


@dataclass(frozen=True, slots=True)
class FeatureImportance:
    feature: str
    mean_abs: float
    mean: float
    std: float


@dataclass(frozen=True, slots=True)
class OutputImportance:
    """One output's importance (the only one unless multiclass), largest mean |phi| first."""

    output: str | None
    features: list[FeatureImportance]


def importance(aggregate: Aggregate, schema: ModelSchema) -> list[OutputImportance]:
    """Mean |phi|, mean phi and the standard deviation of phi per feature, per output."""
    outputs = []
    n = max(aggregate.count, 1)
    for o, name in enumerate(output_names(schema)):
        mean = aggregate.sum[o] / n
        variance = np.maximum(aggregate.sq_sum[o] / n - mean**2, 0.0)
        rows = [
            FeatureImportance(
                f.name,
                float(aggregate.abs_sum[o, i] / n),
                float(mean[i]),
                float(math.sqrt(variance[i])),
            )
            for i, f in enumerate(schema.features)
        ]
        rows.sort(key=lambda r: -r.mean_abs)
        outputs.append(OutputImportance(name, rows))
    return outputs


@dataclass(frozen=True, slots=True)
class InputDrift:
    feature: str
    psi: float


@dataclass(frozen=True, slots=True)
class OutputDrift:
    output: str | None
    ndcg: float
    features: list[FeatureDrift]


@dataclass(frozen=True, slots=True)
class DriftFigures:
    """One span (a day, or the window) against the reference."""

    decisions: int
    outputs: list[OutputDrift]
    inputs: list[InputDrift]

    @property
    def drifting(self) -> list[str]:
        return sorted({f.feature for o in self.outputs for f in o.features if f.drifting})


def drift(
    current: Aggregate, reference: Reference, schema: ModelSchema, rule: DriftRule
) -> DriftFigures:
    """Every feature's attribution drift (per output), the ranking's nDCG, the inputs' PSI."""
    if current.edges != reference.aggregate.edges:
        raise ValueError("the decisions were binned on other edges than the reference's")
    base = reference.aggregate
    outputs = []
    for o, name in enumerate(output_names(schema)):
        figures = compare_all(schema.feature_names, base.hist[o], current.hist[o], rule)
        ranking = ndcg(base.abs_sum[o], current.abs_sum[o]) if current.count else math.nan
        outputs.append(OutputDrift(name, ranking, figures))
    stability = psi_all(base.inputs, current.inputs)
    inputs = [InputDrift(f.name, float(stability[i])) for i, f in enumerate(schema.features)]
    return DriftFigures(current.count, outputs, inputs)


@dataclass(frozen=True, slots=True)
class ReasonDay:
    day: date
    decisions: int
    outcomes: dict[str, int]
    denials: int
    # Denials giving each reason family, and that as a share of the day's denials.
    families: dict[str, int]

    @property
    def frequencies(self) -> dict[str, float]:
        return {f: n / self.denials for f, n in self.families.items()} if self.denials else {}


def reasons(days: dict[date, Aggregate]) -> list[ReasonDay]:
    return [
        ReasonDay(day, a.count, dict(a.outcomes), a.denials, dict(sorted(a.reasons.items())))
        for day, a in sorted(days.items())
    ]
