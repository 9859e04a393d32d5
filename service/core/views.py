"""The client's view of a stored record: attributions keyed by feature (and class) name."""

from datetime import datetime

from pydantic import Field

from service.core.records import DecisionRecord, Features, ModelRef, Prediction, Reason, Wire
from service.core.schema import ModelSchema, Task

Attributions = dict[str, float] | dict[str, dict[str, float]]


class ExplanationView(Wire):
    transaction_id: str
    model: ModelRef
    features: Features
    prediction: Prediction
    base_value: float | dict[str, float]
    attributions: Attributions
    additivity_error: float
    engine: str
    model_format: str | None = Field(
        description='The framework of the model that decided: "xgboost", "lightgbm" or '
        '"sklearn"; null for decisions explained before it was recorded.'
    )
    framework_version: str | None = Field(
        description="The version of that framework that wrote the model file; null when the "
        "file does not say, or for decisions explained before it was recorded."
    )
    decided_at: datetime
    explained_at: datetime
    # The principal reasons of a denial (empty otherwise), ranked.
    reasons: list[Reason]
    protected_share: float | None
    record_hash: str


def explanation_view(record: DecisionRecord, schema: ModelSchema) -> ExplanationView:
    """Name every number: margin-space SHAP values by feature, per class for multiclass."""
    names = schema.feature_names
    by_output = [dict(zip(names, row, strict=True)) for row in record.attributions]
    attributions: Attributions
    base: float | dict[str, float]
    if schema.task is Task.MULTICLASS:
        attributions = dict(zip(schema.classes, by_output, strict=True))
        base = dict(zip(schema.classes, record.base_value, strict=True))
    else:
        attributions = by_output[0]
        base = record.base_value[0]
    return ExplanationView(
        transaction_id=record.transaction_id,
        model=record.model,
        features=record.features,
        prediction=record.prediction,
        base_value=base,
        attributions=attributions,
        additivity_error=record.additivity_error,
        engine=record.engine,
        model_format=record.model_format,
        framework_version=record.framework_version,
        decided_at=record.decided_at,
        explained_at=record.explained_at,
        reasons=record.reasons,
        protected_share=record.protected_share,
        record_hash=record.record_hash,
    )
