"""Explaining a batch of decisions of one model version."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from numpy.typing import NDArray

from service.core.engine.base import Engine
from service.core.integrity import sealed, stored_attributions
from service.core.reasons import decision_reasons, protected_share
from service.core.records import DecisionEvent, DecisionRecord, MulticlassPrediction
from service.core.registry import LoadedModel
from service.core.schema import ModelSchema

# The worst additivity error accepted, relative to max(1, |served margin|): float32 sums of
# a few hundred trees stay near 1e-6, so anything this large means the event was not
# scored by this model version and the explanation would not explain the decision.
MAX_ADDITIVITY_ERROR = 1e-3


@dataclass(frozen=True, slots=True)
class Failure:
    """An event that cannot be explained, and why (it goes to the dead-letter topic)."""

    event: DecisionEvent
    reason: str

    @property
    def transaction_id(self) -> str:
        return self.event.transaction_id


@dataclass(slots=True)
class ExplainResult:
    """The records of one batch, and the events that could not be explained."""

    records: list[DecisionRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def group_by_version(events: Sequence[DecisionEvent]) -> dict[str, list[DecisionEvent]]:
    """Events keyed by the model version that decided them, in arrival order."""
    groups: dict[str, list[DecisionEvent]] = {}
    for event in events:
        groups.setdefault(event.model.version, []).append(event)
    return groups


def _served_margins(model: LoadedModel, event: DecisionEvent) -> list[float] | str:
    """The margins the gateway served, in output order, or why they are unusable."""
    prediction = event.prediction
    if prediction.task != model.schema.task.value:
        return f"a {prediction.task} prediction for a {model.schema.task.value} model"
    if isinstance(prediction, MulticlassPrediction):
        by_class = prediction.margins_by_class
        if set(by_class) != set(model.schema.classes):
            return "the prediction's classes differ from the model's"
        return [by_class[label] for label in model.schema.classes]
    return prediction.margins


def explain_batch(
    model: LoadedModel,
    engine: Engine,
    events: Sequence[DecisionEvent],
    explained_at: datetime,
    max_additivity_error: float = MAX_ADDITIVITY_ERROR,
) -> ExplainResult:
    """Explain every event of `model`'s version with one engine call for the whole batch."""
    result = ExplainResult()
    usable, served = _usable(model, events, result.failures)
    batch = model.encode_batch([event.features for event in usable])
    for index, errors in batch.errors.items():
        reason = "invalid features: " + "; ".join(f"{e.field}: {e.reason}" for e in errors)
        result.failures.append(Failure(usable[index], reason))
    if not batch.rows:
        return result
    contributions = engine.contributions(batch.x)
    served_rows = np.asarray([served[i] for i in batch.rows], dtype=np.float64)
    additivity = _additivity_errors(contributions, served_rows)
    for row, index in enumerate(batch.rows):
        error = float(additivity[row])
        tolerance = max_additivity_error * max(1.0, float(np.abs(served_rows[row]).max()))
        if error <= tolerance:
            record = _record(
                model.schema, usable[index], contributions[row], error, engine.name, explained_at
            )
            result.records.append(record)
        else:
            reason = f"additivity error {error:.3g} exceeds {tolerance:.3g}"
            result.failures.append(Failure(usable[index], reason))
    return result


def _usable(
    model: LoadedModel, events: Sequence[DecisionEvent], failures: list[Failure]
) -> tuple[list[DecisionEvent], list[list[float]]]:
    """The events of this version with usable served margins; the others become failures."""
    usable: list[DecisionEvent] = []
    served: list[list[float]] = []
    for event in events:
        if event.model.version != model.version:
            margins: list[float] | str = (
                f"decided by version {event.model.version}, not {model.version}"
            )
        else:
            margins = _served_margins(model, event)
        if isinstance(margins, str):
            failures.append(Failure(event, margins))
        else:
            usable.append(event)
            served.append(margins)
    return usable, served


def _record(
    schema: ModelSchema,
    event: DecisionEvent,
    contributions: NDArray[np.float64],
    error: float,
    engine: str,
    explained_at: datetime,
) -> DecisionRecord:
    """The sealed decision record of one event from its (outputs, features + 1) attributions."""
    # Rounded to the float32 the stores keep before reasons and hash are derived from them,
    # so the record read back is the record hashed.
    attributions = stored_attributions(contributions[:, :-1])
    # Built without validation: every part comes validated (the event) or typed (numpy's
    # floats, the reasons), and validating ~25 fields again cost the worker ~15 us a record.
    record = DecisionRecord.model_construct(
        transaction_id=event.transaction_id,
        model=event.model,
        features=event.features,
        prediction=event.prediction,
        # The bias column, never shap's expected_value (it can lag the true base value).
        base_value=contributions[:, -1].tolist(),
        attributions=attributions,
        additivity_error=error,
        engine=engine,
        decided_at=event.decided_at,
        explained_at=explained_at,
        reasons=decision_reasons(schema, event.prediction, attributions, event.features),
        protected_share=protected_share(schema, attributions),
        record_hash="",
    )
    return sealed(record)


def _additivity_errors(
    contributions: NDArray[np.float64], margins: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Per row, max over outputs of |sum of attributions + bias - served margin|."""
    errors: NDArray[np.float64] = np.abs(contributions.sum(axis=2) - margins).max(axis=1)
    return errors
