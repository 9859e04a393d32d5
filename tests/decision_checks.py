"""Checks on an explanation as the API shows it: reasons, protected share, record hash."""

from typing import Any

from service.core.integrity import verify_record
from service.core.records import DecisionRecord
from service.core.schema import ModelSchema, Task


def record_of(explanation: dict[str, Any], schema: ModelSchema) -> DecisionRecord:
    """The decision record behind a binary or regression model's `GET /v1/explanations` body."""
    assert schema.task is not Task.MULTICLASS
    names = schema.feature_names
    return DecisionRecord.model_validate(
        {
            **explanation,
            "base_value": [explanation["base_value"]],
            "attributions": [[explanation["attributions"][name] for name in names]],
        }
    )


def assert_adverse_action(explanation: dict[str, Any], schema: ModelSchema) -> None:
    """A denial names its reasons (never a protected attribute), its share and a sound hash."""
    assert explanation["prediction"]["decision"] == "deny"
    reasons = explanation["reasons"]
    assert 1 <= len(reasons) <= 4
    families = {family.name: family for family in schema.families}
    protected = {feature.name for feature in schema.features if feature.protected}
    for reason in reasons:
        # True of the applicant: a judgement of values they gave, or what they did not give.
        family = families[reason["family"]]
        given = [explanation["features"][name] is not None for name in reason["features"]]
        assert all(given) or not any(given), reason
        assert reason["reason"] == (family.reason if all(given) else family.missing_reason)
        assert reason["contribution"] > 0
        assert not protected.intersection(reason["features"])
    contributions = [reason["contribution"] for reason in reasons]
    assert contributions == sorted(contributions, reverse=True)
    assert 0.0 <= explanation["protected_share"] <= 1.0
    assert verify_record(record_of(explanation, schema))
