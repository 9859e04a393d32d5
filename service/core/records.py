"""The decision event (what the gateway publishes) and the decision record (what is stored)."""

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

EVENT_SCHEMA_VERSION: Final = 1

# int before float: an auditor sees the inputs exactly as the client sent them.
FeatureValue = int | float | str | None
Features = dict[str, FeatureValue]


class Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelRef(Wire):
    name: str
    version: str


class BinaryPrediction(Wire):
    task: Literal["binary"] = "binary"
    probability: float
    margin: float
    decision: Literal["approve", "deny"]

    @property
    def margins(self) -> list[float]:
        return [self.margin]


class RegressionPrediction(Wire):
    task: Literal["regression"] = "regression"
    value: float
    margin: float

    @property
    def margins(self) -> list[float]:
        return [self.margin]


class MulticlassPrediction(Wire):
    task: Literal["multiclass"] = "multiclass"
    # `class` is a keyword; the wire name stays `class`.
    label: str = Field(alias="class")
    probabilities: dict[str, float]
    margins_by_class: dict[str, float] = Field(alias="margins")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def margins(self) -> list[float]:
        return list(self.margins_by_class.values())


Prediction = Annotated[
    BinaryPrediction | RegressionPrediction | MulticlassPrediction, Field(discriminator="task")
]


class DecisionEvent(Wire):
    """Published by the gateway once per decision; the Kafka key is the transaction id."""

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    transaction_id: str
    model: ModelRef
    features: Features
    prediction: Prediction
    decided_at: datetime
    # The fingerprint of the caller's request when the caller chose the transaction id: a
    # worker meeting the id again in the log tells a repeat of the same request from a
    # conflicting one by it. None for ids the gateway generated (they cannot repeat).
    request_hash: str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))

    @classmethod
    def from_bytes(cls, payload: bytes) -> "DecisionEvent":
        return cls.model_validate_json(payload)

    def answer(self) -> "DecisionResponse":
        """What the gateway answered for this decision (the worker rebuilds it from the event)."""
        return DecisionResponse(
            transaction_id=self.transaction_id, model=self.model, prediction=self.prediction
        )

    def claim(self) -> "Claim":
        """The claim of this decision's transaction id: its request and its answer's bytes."""
        return Claim(
            transaction_id=self.transaction_id,
            request_hash=self.request_hash or "",
            response=self.answer().to_bytes(),
        )


class DecisionResponse(Wire):
    """The gateway's answer; a repeat of the request gets exactly the same bytes."""

    transaction_id: str
    model: ModelRef
    prediction: Prediction

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))


class Reason(Wire):
    """A principal reason for an adverse decision: one reason family of the model's schema."""

    family: str
    reason: str
    # Summed margin-space attributions of the family's features; positive pushes toward denial.
    contribution: float
    features: list[str]


class DecisionRecord(Wire):
    """The stored explanation of one decision, in the model's margin space.

    `base_value` and each row of `attributions` have one entry per output (one output
    unless multiclass); attribution columns follow the schema's feature order. `reasons`
    are the principal reasons of a denial (empty otherwise); `protected_share` is the share
    of absolute attribution on protected features (None when the schema marks none);
    `record_hash` is `service.core.integrity.record_hash` of everything else.

    `model_format` ("xgboost", "lightgbm", "sklearn") and `framework_version` (the version of
    that framework that wrote the model file) name the framework whose model decided and was
    explained. Both are None in records stored before they were kept; `framework_version`
    alone is None when the model file does not say.
    """

    transaction_id: str
    model: ModelRef
    features: Features
    prediction: Prediction
    base_value: list[float]
    attributions: list[list[float]]
    additivity_error: float
    engine: str
    model_format: str | None
    framework_version: str | None
    decided_at: datetime
    explained_at: datetime
    reasons: list[Reason]
    protected_share: float | None
    record_hash: str


class ModelArtifact(Wire):
    """A model version as stored, so any worker can load the exact version an event names."""

    name: str
    version: str
    schema_bytes: bytes
    model_bytes: bytes


class Claim(Wire):
    """The answer given for a transaction id, written by the worker with the decision's record.

    A repeat of the request gets `response` back byte for byte; a different request under the
    same id (another `request_hash`) is refused.
    """

    transaction_id: str
    request_hash: str
    response: bytes


@dataclass(frozen=True, slots=True)
class DecisionSummary:
    """A line of a list of decisions: enough to find one, none of its inputs or attributions."""

    transaction_id: str
    model: ModelRef
    decided_at: datetime
    prediction: Prediction


# Where a page of recent decisions ends: the next page starts strictly before it.
@dataclass(frozen=True, slots=True)
class DecisionCursor:
    decided_at: datetime
    transaction_id: str
