"""The feature schema of a model: what a request must carry and how it is encoded."""

from enum import StrEnum
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_FILE = "schema.json"
SCHEMA_VERSION: Final = 1


class FeatureType(StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


class Task(StrEnum):
    BINARY = "binary"
    REGRESSION = "regression"
    MULTICLASS = "multiclass"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Feature(Frozen):
    """One input column, in the booster's column order."""

    name: str = Field(min_length=1)
    type: FeatureType
    # Fixed order: a category's position is the code the booster was trained with.
    categories: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = True
    monotone: Literal[-1, 0, 1] = 0
    description: str = ""
    # Filled in by later work on reason codes; kept here so schemas stay forward compatible.
    family: str | None = None
    reason: str | None = None
    protected: bool = False

    @model_validator(mode="after")
    def _categories_match_type(self) -> "Feature":
        if self.type is FeatureType.CATEGORICAL and not self.categories:
            raise ValueError(f"categorical feature {self.name!r} needs its categories")
        if self.type is FeatureType.NUMERIC and self.categories:
            raise ValueError(f"numeric feature {self.name!r} cannot have categories")
        return self


class DecisionRule(Frozen):
    """Binary models: the model outputs the probability of `positive_class` (e.g. default risk)."""

    positive_class: str = "positive"
    negative_class: str = "negative"
    # The decision is `deny` when that probability is at or above the threshold.
    deny_at_or_above: float = Field(default=0.5, ge=0.0, le=1.0)


class ModelSchema(Frozen):
    """Everything the service needs to know about a model besides its trees."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: Task
    model_file: str = "model.json"
    features: tuple[Feature, ...] = Field(min_length=1)
    classes: tuple[str, ...] = ()
    decision: DecisionRule | None = None
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSchema":
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.task is Task.MULTICLASS and len(self.classes) < 2:
            raise ValueError("a multiclass model needs at least two class labels")
        if self.task is Task.BINARY and self.decision is None:
            raise ValueError("a binary model needs a decision rule")
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def outputs(self) -> int:
        """Margin columns the booster produces (one per class for multiclass)."""
        return len(self.classes) if self.task is Task.MULTICLASS else 1
