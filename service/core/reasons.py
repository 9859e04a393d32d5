"""Adverse-action reasons and the reliance on protected attributes, from a record's attributions.

Attributions are in margin space. A binary model's margin is the log-odds of the schema's
positive class, and the decision is `deny` at or above the threshold, so a positive
attribution pushes toward denial. A family's contribution is the sum of its features'
attributions; the principal reasons are the families pushing toward denial the most.
Protected features belong to no family (the schema refuses it), so they are never a reason.
"""

from collections.abc import Sequence
from typing import Final

from service.core.records import BinaryPrediction, Prediction, Reason
from service.core.schema import ModelSchema, Task

# Regulation B asks for the principal reasons, and the CFPB's model notices give up to four.
MAX_REASONS: Final = 4


def principal_reasons(
    schema: ModelSchema, attributions_row: Sequence[float], limit: int = MAX_REASONS
) -> list[Reason]:
    """Families whose summed attribution pushes toward denial, largest first, at most `limit`."""
    texts = {family.name: family.reason for family in schema.families}
    sums: dict[str, float] = {}
    members: dict[str, list[str]] = {}
    for feature, value in zip(schema.features, attributions_row, strict=True):
        if feature.family is None:
            continue
        sums[feature.family] = sums.get(feature.family, 0.0) + value
        members.setdefault(feature.family, []).append(feature.name)
    # Ties keep the schema's family order, so the same record always gives the same reasons.
    order = {family.name: index for index, family in enumerate(schema.families)}
    ranked = sorted((name for name in sums if sums[name] > 0), key=lambda n: (-sums[n], order[n]))
    return [
        Reason(family=name, reason=texts[name], contribution=sums[name], features=members[name])
        for name in ranked[:limit]
    ]


def decision_reasons(
    schema: ModelSchema, prediction: Prediction, attributions: Sequence[Sequence[float]]
) -> list[Reason]:
    """The principal reasons of an adverse action: a binary model's `deny`; otherwise none."""
    if schema.task is not Task.BINARY or not isinstance(prediction, BinaryPrediction):
        return []
    if prediction.decision != "deny":
        return []
    return principal_reasons(schema, attributions[0])


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
