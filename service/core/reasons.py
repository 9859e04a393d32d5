"""Adverse-action reasons and the reliance on protected attributes, from a record's attributions.

Attributions are in margin space. A binary model's margin is the log-odds of the schema's
positive class, and the decision is `deny` at or above the threshold, so a positive
attribution pushes toward denial. A family's contribution is the sum of its features'
attributions; the principal reasons are the families pushing toward denial the most.
Protected features belong to no family (the schema refuses it), so they are never a reason.

A reason must be true of the applicant. "Credit amount is high" is false of an applicant who
gave no amount, even when the model's handling of the missing value pushed toward denial: what
was not provided is a reason of its own ("Credit amount not provided"). So each family counts
as two candidates, its features the applicant gave and those left null, each summed and ranked
on its own; a family with both kinds can give both reasons.
"""

from collections.abc import Collection, Mapping, Sequence
from typing import Final

from service.core.records import BinaryPrediction, Prediction, Reason
from service.core.schema import Feature, ModelSchema, ReasonFamily, Task

# Regulation B asks for the principal reasons, and the CFPB's model notices give up to four.
MAX_REASONS: Final = 4


def missing_features(features: Mapping[str, object]) -> frozenset[str]:
    """The features a request left null (not provided)."""
    return frozenset(name for name, value in features.items() if value is None)


def principal_reasons(
    schema: ModelSchema,
    attributions_row: Sequence[float],
    limit: int = MAX_REASONS,
    missing: Collection[str] = frozenset(),
) -> list[Reason]:
    """Families whose summed attribution pushes toward denial, largest first, at most `limit`.

    Features named in `missing` were not provided: they count apart from the family's given
    features, under the family's `missing_reason`.
    """
    sums: dict[tuple[str, bool], float] = {}
    members: dict[tuple[str, bool], list[Feature]] = {}
    for feature, value in zip(schema.features, attributions_row, strict=True):
        if feature.family is None:
            continue
        key = (feature.family, feature.name in missing)
        sums[key] = sums.get(key, 0.0) + value
        members.setdefault(key, []).append(feature)
    families = {family.name: family for family in schema.families}
    # Ties keep the schema's family order (given before missing), so the same record always
    # gives the same reasons.
    order = {family.name: index for index, family in enumerate(schema.families)}
    ranked = sorted((k for k in sums if sums[k] > 0), key=lambda k: (-sums[k], order[k[0]], k[1]))
    return [
        Reason(
            family=name,
            reason=_text(families[name], members[name, absent], absent),
            contribution=sums[name, absent],
            features=[feature.name for feature in members[name, absent]],
        )
        for name, absent in ranked[:limit]
    ]


def _text(family: ReasonFamily, features: Sequence[Feature], absent: bool) -> str:
    if not absent:
        return family.reason
    if family.missing_reason is not None:
        return family.missing_reason
    return "Not provided: " + ", ".join(f.description or f.name for f in features)


def decision_reasons(
    schema: ModelSchema,
    prediction: Prediction,
    attributions: Sequence[Sequence[float]],
    features: Mapping[str, object] | None = None,
) -> list[Reason]:
    """The principal reasons of an adverse action: a binary model's `deny`; otherwise none.

    `features` are the request's inputs: those it left null are reasons as not provided.
    """
    if schema.task is not Task.BINARY or not isinstance(prediction, BinaryPrediction):
        return []
    if prediction.decision != "deny":
        return []
    missing = missing_features(features) if features is not None else frozenset()
    return principal_reasons(schema, attributions[0], missing=missing)


def protected_share(schema: ModelSchema, attributions: Sequence[Sequence[float]]) -> float | None:
    """Share of the total absolute attribution (all outputs) on protected features.

    Reported for every task: a regression or multiclass model relying on a protected
    attribute is as visible as a binary one. None when the schema marks no feature protected,
    so "none declared" never reads as "not relied upon"; 0.0 when every attribution is zero.
    """
    protected = [feature.protected for feature in schema.features]
    if not any(protected):
        return None
    total = 0.0
    on_protected = 0.0
    for row in attributions:
        for is_protected, value in zip(protected, row, strict=True):
            total += abs(value)
            if is_protected:
                on_protected += abs(value)
    return on_protected / total if total > 0 else 0.0
