"""Today's population figures as Prometheus gauges, refreshed from the stored aggregates.

The gateway refreshes them every `refresh_s` for the versions it serves: one partition read
per version, never a record. Per feature the gauges show the worst output (the largest PSI,
JS and KS, drifting if any class drifts; the smallest nDCG), so a multiclass model keeps the
same bounded labels: model name, the version's first 12 characters, and a schema's feature,
outcome or reason family.
"""

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from service.core.population import report
from service.core.population.aggregates import Aggregate
from service.core.population.drift import DriftRule
from service.core.population.reference import Reference
from service.core.ports import PopulationStore
from service.core.registry import LoadedModel
from service.metrics import PopulationMetrics

log = logging.getLogger(__name__)

VERSION_LABEL = 12


class PopulationGauges:
    def __init__(
        self,
        store: PopulationStore,
        models: Sequence[LoadedModel],
        metrics: PopulationMetrics,
        rule: DriftRule | None = None,
    ) -> None:
        self._store = store
        self._models = list(models)
        self._metrics = metrics
        self._rule = rule or DriftRule()

    async def run(self, stop: asyncio.Event, refresh_s: float) -> None:
        """Refresh until `stop` is set; a failed refresh is logged and tried again later."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:
                log.warning("population gauges not refreshed; trying again", exc_info=True)
            try:
                async with asyncio.timeout(refresh_s):
                    await stop.wait()
            except TimeoutError:
                continue

    async def refresh(self) -> None:
        today = datetime.now(UTC).date()
        for model in self._models:
            days = await report.daily(self._store, model.version, [today])
            reference = await report.reference_of(self._store, model.version)
            self._show(model, days.get(today), reference)
        self._metrics.refreshed.set(time.time())

    def _show(
        self,
        model: LoadedModel,
        today: Aggregate | None,
        reference: Reference | None,
    ) -> None:
        labels = {"model": model.name, "version": model.version[:VERSION_LABEL]}
        outcomes = today.outcomes if today is not None else {}
        for outcome in _outcomes(model):
            self._metrics.decisions.labels(**labels, outcome=outcome).set(outcomes.get(outcome, 0))
        families = today.reasons if today is not None else {}
        for family in model.schema.families:
            count = families.get(family.name, 0)
            self._metrics.reasons.labels(**labels, family=family.name).set(count)
        if reference is None or today is None or today.edges != reference.aggregate.edges:
            return
        figures = report.drift(today, reference, model.schema, self._rule)
        self._metrics.ndcg.labels(**labels).set(_worst(o.ndcg for o in figures.outputs))
        for i, feature in enumerate(model.schema.features):
            per_output = [o.features[i] for o in figures.outputs]
            feature_labels = {**labels, "feature": feature.name}
            self._metrics.drift_psi.labels(**feature_labels).set(
                _largest(f.psi for f in per_output)
            )
            self._metrics.drift_js.labels(**feature_labels).set(_largest(f.js for f in per_output))
            self._metrics.drift_ks.labels(**feature_labels).set(_largest(f.ks for f in per_output))
            drifting = any(f.drifting for f in per_output)
            self._metrics.drifting.labels(**feature_labels).set(1 if drifting else 0)
            self._metrics.input_drift_psi.labels(**feature_labels).set(figures.inputs[i].psi)


def _outcomes(model: LoadedModel) -> list[str]:
    if model.schema.decision is not None:
        return ["approve", "deny"]
    return list(model.schema.classes) or ["value"]


def _largest(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def _worst(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan
