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
    # False marks a required feature: an application without its value (null) is refused
    # (422 naming it) instead of decided. True lets `null` stand for a value not provided.
    nullable: bool = True
    monotone: Literal[-1, 0, 1] = 0
    description: str = ""
    # The reason family this feature's attribution counts toward (see `ModelSchema.families`).
    family: str | None = None
    # Protected attributes (ECOA / Regulation B) are never a reason; only their share is reported.
    protected: bool = False

    @model_validator(mode="after")
    def _categories_match_type(self) -> "Feature":
        if self.type is FeatureType.CATEGORICAL and not self.categories:
            raise ValueError(f"categorical feature {self.name!r} needs its categories")
        if self.type is FeatureType.NUMERIC and self.categories:
            raise ValueError(f"numeric feature {self.name!r} cannot have categories")
        if self.protected and self.family is not None:
            raise ValueError(
                f"protected feature {self.name!r} cannot belong to a reason family: "
                "a protected attribute is never given as a reason"
            )
        return self


class ReasonFamily(Frozen):
    """Related features summed into one principal reason, with the text a notice would give.

    `reason` speaks of values the applicant gave ("Credit amount is high"), so it is given
    only for what the applicant's present values pushed. What their missing values pushed is
    a reason of its own, worded `missing_reason` ("Credit amount not provided"); without
    one, the text names the missing features by description.
    """

    name: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    # Left out of the stored schema while unset, so versions hashed before it existed keep
    # their hash (a version is the hash of the model file and the canonical schema).
    missing_reason: str | None = Field(
        default=None, min_length=1, exclude_if=lambda value: value is None
    )


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
    # Reason families for adverse-action notices; none means decisions carry no reasons.
    families: tuple[ReasonFamily, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSchema":
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        self._check_families()
        if self.task is Task.MULTICLASS and len(self.classes) < 2:
            raise ValueError("a multiclass model needs at least two class labels")
        if self.task is Task.BINARY and self.decision is None:
            raise ValueError("a binary model needs a decision rule")
        return self

    def _check_families(self) -> None:
        families = [family.name for family in self.families]
        if len(set(families)) != len(families):
            raise ValueError("reason family names must be unique")
        used = {f.family for f in self.features if f.family is not None}
        unknown = sorted(used.difference(families))
        if unknown:
            raise ValueError(f"features name reason families the schema lacks: {unknown}")
        # A family no feature belongs to is a typo, not a reason that can ever be given.
        empty = [name for name in families if name not in used]
        if empty:
            raise ValueError(f"reason families without features: {empty}")
        # Likewise a missing_reason no missing value can ever call for.
        nullable = {f.family for f in self.features if f.family is not None and f.nullable}
        never = [f.name for f in self.families if f.missing_reason and f.name not in nullable]
        if never:
            raise ValueError(
                f"reason families with a missing_reason but no nullable feature: {never}"
            )

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def outputs(self) -> int:
        """Margin columns the booster produces (one per class for multiclass)."""
        return len(self.classes) if self.task is Task.MULTICLASS else 1
