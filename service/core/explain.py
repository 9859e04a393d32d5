"""Explaining a batch of decisions of one model version."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from service.core.engine.base import Engine
from service.core.integrity import sealed, stored_attributions
from service.core.reasons import decision_reasons, protected_share
from service.core.records import DecisionEvent, DecisionRecord, MulticlassPrediction
from service.core.registry import LoadedModel

# The worst additivity error accepted, relative to max(1, |served margin|): float32 sums of
# a few hundred trees stay near 1e-6, so anything this large means the event was not
# scored by this model version and the explanation would not explain the decision.
MAX_ADDITIVITY_ERROR = 1e-3


class DeadLetterReason(StrEnum):
    """Why an event is set aside unexplained: a stable slug, the dead-letter header (Kafka) or
    column (embedded) and the label of `shapstream_dead_letters_total`."""

    # Not a decision event at all.
    MALFORMED = "malformed"
    # A later event under a transaction id already decided differently (workers/first_events.py).
    CONFLICTING_ID = "conflicting-transaction-id"
    # Neither the worker nor the store knows the model version the event names.
    UNKNOWN_MODEL_VERSION = "unknown-model-version"
    # The version is stored but does not load.
    INVALID_MODEL = "invalid-model"
    # The event was handed to a model of another version than the one that decided it.
    MODEL_VERSION_MISMATCH = "model-version-mismatch"
    # The served prediction does not fit the model (task, or classes).
    PREDICTION_MISMATCH = "prediction-mismatch"
    INVALID_FEATURES = "invalid-features"
    # The attributions do not add up to the served margin: not scored by this model version.
    ADDITIVITY_ERROR = "additivity-error"
    # The engine raised on this event alone.
    EXPLAIN_FAILED = "explain-failed"
    # The store refused the explained record's content.
    UNSTORABLE = "unstorable-record"


@dataclass(frozen=True, slots=True)
class Failure:
    """An event that cannot be explained: why (its dead-letter reason), and the details."""

    event: DecisionEvent
    reason: DeadLetterReason
    detail: str

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


def _served_margins(model: LoadedModel, event: DecisionEvent) -> list[float] | Failure:
    """The margins the gateway served, in output order, or why they are unusable."""
    if event.model.version != model.version:
        detail = f"decided by version {event.model.version}, not {model.version}"
        return Failure(event, DeadLetterReason.MODEL_VERSION_MISMATCH, detail)
    prediction = event.prediction
    if prediction.task != model.schema.task.value:
        detail = f"a {prediction.task} prediction for a {model.schema.task.value} model"
        return Failure(event, DeadLetterReason.PREDICTION_MISMATCH, detail)
    if isinstance(prediction, MulticlassPrediction):
        by_class = prediction.margins_by_class
        if set(by_class) != set(model.schema.classes):
            detail = "the prediction's classes differ from the model's"
            return Failure(event, DeadLetterReason.PREDICTION_MISMATCH, detail)
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
        detail = "; ".join(f"{e.field}: {e.reason}" for e in errors)
        result.failures.append(Failure(usable[index], DeadLetterReason.INVALID_FEATURES, detail))
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
                model, usable[index], contributions[row], error, engine.name, explained_at
            )
            result.records.append(record)
        else:
            detail = f"additivity error {error:.3g} exceeds {tolerance:.3g}"
            failure = Failure(usable[index], DeadLetterReason.ADDITIVITY_ERROR, detail)
            result.failures.append(failure)
    return result


def _usable(
    model: LoadedModel, events: Sequence[DecisionEvent], failures: list[Failure]
) -> tuple[list[DecisionEvent], list[list[float]]]:
    """The events of this version with usable served margins; the others become failures."""
    usable: list[DecisionEvent] = []
    served: list[list[float]] = []
    for event in events:
        margins = _served_margins(model, event)
        if isinstance(margins, Failure):
            failures.append(margins)
        else:
            usable.append(event)
            served.append(margins)
    return usable, served


def _record(
    model: LoadedModel,
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
    schema = model.schema
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
        # The version hash pins the file; these say which framework's model it is, for whoever
        # reads the record without the model at hand. An unknown version is None, never "": a
        # CSV export cannot tell "" from null.
        model_format=model.format,
        framework_version=model.framework.framework_version or None,
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
