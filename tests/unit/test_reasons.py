"""Adverse-action reasons and the protected share, on the demo model and real applicants."""

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from service.core.explain import explain_batch
from service.core.reasons import (
    MAX_REASONS,
    decision_reasons,
    principal_reasons,
    protected_share,
)
from service.core.records import (
    BinaryPrediction,
    DecisionEvent,
    DecisionRecord,
    ModelRef,
    RegressionPrediction,
)
from service.core.registry import LoadedModel
from service.core.schema import (
    DecisionRule,
    Feature,
    FeatureType,
    ModelSchema,
    ReasonFamily,
    Task,
)
from tests.api_client import MODELS, german_rows

DECIDED = datetime(2025, 3, 4, 5, 6, 7, 890_123, tzinfo=UTC)
APPLICANTS = 300


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel.from_directory(MODELS / "german-credit")


def decided_and_explained(model: LoadedModel, rows: list[dict[str, Any]]) -> list[DecisionRecord]:
    """Applicants decided and explained as the gateway and a worker would."""
    events = [
        DecisionEvent(
            transaction_id=f"txn-{i}",
            model=ModelRef(name=model.name, version=model.version),
            features=row,
            prediction=model.predict(row),
            decided_at=DECIDED,
        )
        for i, row in enumerate(rows)
    ]
    result = explain_batch(model, model.framework.reference_engine(), events, DECIDED)
    assert result.failures == []
    return result.records


@pytest.fixture(scope="module")
def records(model: LoadedModel) -> list[DecisionRecord]:
    """Real applicants, every feature given."""
    return decided_and_explained(model, german_rows(APPLICANTS))


def decision_of(record: DecisionRecord) -> str:
    assert isinstance(record.prediction, BinaryPrediction)
    return record.prediction.decision


def family_sums(schema: ModelSchema, row: list[float]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for feature, value in zip(schema.features, row, strict=True):
        if feature.family is not None:
            sums[feature.family] = sums.get(feature.family, 0.0) + value
    return sums


def test_denials_give_the_families_pushing_toward_denial(
    model: LoadedModel, records: list[DecisionRecord]
) -> None:
    schema = model.schema
    texts = {family.name: family.reason for family in schema.families}
    protected = {feature.name for feature in schema.features if feature.protected}
    denied = [record for record in records if decision_of(record) == "deny"]
    assert len(denied) >= 30
    for record in denied:
        sums = family_sums(schema, record.attributions[0])
        pushing = sorted((n for n in sums if sums[n] > 0), key=lambda n: -sums[n])
        assert [r.family for r in record.reasons] == pushing[:MAX_REASONS]
        assert 1 <= len(record.reasons) <= MAX_REASONS
        contributions = [reason.contribution for reason in record.reasons]
        assert contributions == sorted(contributions, reverse=True)
        for reason in record.reasons:
            assert reason.contribution == pytest.approx(sums[reason.family], abs=1e-12)
            assert reason.contribution > 0
            assert reason.reason == texts[reason.family]
            assert reason.features == [f.name for f in schema.features if f.family == reason.family]
            assert not protected.intersection(reason.features)


def test_approvals_have_no_reasons(records: list[DecisionRecord]) -> None:
    approved = [record for record in records if decision_of(record) == "approve"]
    assert len(approved) >= 100
    assert all(record.reasons == [] for record in approved)


def test_protected_share_is_reported_for_every_decision(
    model: LoadedModel, records: list[DecisionRecord]
) -> None:
    protected = [feature.protected for feature in model.schema.features]
    shares = []
    for record in records:
        row = record.attributions[0]
        on_protected = sum(abs(v) for v, p in zip(row, protected, strict=True) if p)
        expected = on_protected / sum(abs(v) for v in row)
        assert record.protected_share == pytest.approx(expected, rel=1e-12)
        shares.append(expected)
    # The demo model does lean on age and the rest: the share shows it instead of hiding it.
    assert 0 < max(shares) < 1


def test_every_non_protected_demo_feature_has_a_family(model: LoadedModel) -> None:
    for feature in model.schema.features:
        assert (feature.family is None) == feature.protected, feature.name
    assert all(family.reason for family in model.schema.families)


def small_schema(families: tuple[ReasonFamily, ...] = (), **family_of: str) -> ModelSchema:
    names = ("duration", "amount", "rate", "age")
    return ModelSchema(
        name="small",
        task=Task.BINARY,
        features=tuple(
            Feature(
                name=name,
                type=FeatureType.NUMERIC,
                family=family_of.get(name),
                protected=name == "age",
            )
            for name in names
        ),
        decision=DecisionRule(positive_class="bad", negative_class="good"),
        families=families,
    )


FAMILIES = (
    ReasonFamily(name="term", reason="Duration of credit is long"),
    ReasonFamily(name="size", reason="Credit amount is high"),
)


def test_families_sum_and_rank() -> None:
    schema = small_schema(FAMILIES, duration="term", amount="size", rate="size")
    reasons = principal_reasons(schema, [0.25, 0.5, -0.125, 3.0])
    assert [(r.family, r.contribution, r.features) for r in reasons] == [
        ("size", 0.375, ["amount", "rate"]),
        ("term", 0.25, ["duration"]),
    ]
    assert principal_reasons(schema, [0.25, 0.5, -0.125, 3.0], limit=1)[0].family == "size"
    # Pulling toward approval is no reason, and the protected age never is.
    assert principal_reasons(schema, [-0.25, 0.5, -0.75, 3.0]) == []


def test_ties_keep_the_schema_order() -> None:
    schema = small_schema(FAMILIES, duration="term", amount="size")
    assert [r.family for r in principal_reasons(schema, [0.5, 0.5, 0.0, 0.0])] == ["term", "size"]


def test_only_a_binary_denial_has_reasons() -> None:
    schema = small_schema(FAMILIES, duration="term", amount="size")
    row = [[0.5, 0.25, 0.0, 0.0]]
    deny = BinaryPrediction(probability=0.7, margin=0.8, decision="deny")
    approve = BinaryPrediction(probability=0.3, margin=-0.8, decision="approve")
    assert [r.family for r in decision_reasons(schema, deny, row)] == ["term", "size"]
    assert decision_reasons(schema, approve, row) == []
    regression = RegressionPrediction(value=1.0, margin=1.0)
    assert decision_reasons(schema, regression, row) == []


def test_no_families_no_reasons_but_still_a_share() -> None:
    """A schema from `shapstream model init` has no families yet: no reasons, a share."""
    schema = small_schema()
    row = [0.5, -0.25, 0.0, -0.25]
    deny = BinaryPrediction(probability=0.7, margin=0.8, decision="deny")
    assert decision_reasons(schema, deny, [row]) == []
    assert protected_share(schema, [row]) == 0.25


def test_protected_share_edges() -> None:
    schema = small_schema()
    assert protected_share(schema, [[0.0, 0.0, 0.0, 0.0]]) == 0.0
    # Over every output of a multiclass row set.
    assert protected_share(schema, [[1.0, 0.0, 0.0, -1.0], [0.0, 1.0, 0.0, 1.0]]) == 0.5
    unprotected = schema.model_copy(
        update={
            "features": tuple(f.model_copy(update={"protected": False}) for f in schema.features)
        }
    )
    assert protected_share(unprotected, [[1.0, 0.0, 0.0, 1.0]]) is None


@pytest.mark.parametrize(
    ("families", "family_of", "message"),
    [
        (FAMILIES, {"duration": "term", "amount": "size", "age": "size"}, "protected feature"),
        (FAMILIES, {"duration": "term", "amount": "sizes"}, "lacks"),
        (FAMILIES + FAMILIES[:1], {"duration": "term", "amount": "size"}, "unique"),
        (FAMILIES, {"duration": "term"}, "without features"),
    ],
    ids=["protected-in-a-family", "unknown-family", "duplicate-family", "empty-family"],
)
def test_inconsistent_families_are_refused(
    families: tuple[ReasonFamily, ...], family_of: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        small_schema(families, **family_of)


def test_the_demo_schema_refuses_a_protected_reason(model: LoadedModel) -> None:
    document = model.schema.model_dump(mode="json")
    for feature in document["features"]:
        if feature["name"] == "age_in_years":
            feature["family"] = "history"
    with pytest.raises(ValidationError, match="protected feature 'age_in_years'"):
        ModelSchema.model_validate(document)


# --- missing values: a reason must be true of the applicant ----------------------------------

WITH_MISSING = (
    ReasonFamily(name="term", reason="Duration of credit is long"),
    ReasonFamily(
        name="size", reason="Credit amount is high", missing_reason="Credit amount not provided"
    ),
)
DENY = BinaryPrediction(probability=0.9, margin=2.2, decision="deny")


def test_a_missing_value_is_given_as_not_provided() -> None:
    """With the amount null, what it pushed is "not provided", never "Credit amount is high"."""
    schema = small_schema(WITH_MISSING, duration="term", amount="size")
    row = [[0.25, 0.5, 0.0, 0.0]]
    features = {"duration": 12, "amount": None, "rate": 2, "age": 30}
    reasons = decision_reasons(schema, DENY, row, features)
    assert [(r.family, r.reason, r.contribution, r.features) for r in reasons] == [
        ("size", "Credit amount not provided", 0.5, ["amount"]),
        ("term", "Duration of credit is long", 0.25, ["duration"]),
    ]
    assert all(r.reason != "Credit amount is high" for r in reasons)
    # The same row with the amount given reads as before.
    given = decision_reasons(schema, DENY, row, {**features, "amount": 5000})
    assert [r.reason for r in given] == ["Credit amount is high", "Duration of credit is long"]


def test_a_family_with_given_and_missing_features_gives_each_on_its_own() -> None:
    schema = small_schema(WITH_MISSING, duration="term", amount="size", rate="size")
    missing = {"amount"}
    # Given rate pushes, missing amount pushes: two reasons, each with its own features.
    reasons = principal_reasons(schema, [0.0, 0.5, 0.25, 0.0], missing=missing)
    assert [(r.family, r.reason, r.contribution, r.features) for r in reasons] == [
        ("size", "Credit amount not provided", 0.5, ["amount"]),
        ("size", "Credit amount is high", 0.25, ["rate"]),
    ]
    # The missing part pulls toward approval: only what the given value pushed is a reason.
    reasons = principal_reasons(schema, [0.0, -0.5, 0.25, 0.0], missing=missing)
    assert [(r.reason, r.contribution, r.features) for r in reasons] == [
        ("Credit amount is high", 0.25, ["rate"])
    ]
    # And the other way round: the missing amount alone pushed.
    reasons = principal_reasons(schema, [0.0, 0.5, -0.25, 0.0], missing=missing)
    assert [(r.reason, r.features) for r in reasons] == [("Credit amount not provided", ["amount"])]


def test_without_a_missing_reason_the_features_are_named() -> None:
    schema = small_schema(FAMILIES, duration="term", amount="size", rate="size")
    described = schema.model_copy(
        update={
            "features": tuple(
                f.model_copy(update={"description": "Credit amount"}) if f.name == "amount" else f
                for f in schema.features
            )
        }
    )
    reasons = principal_reasons(described, [0.0, 0.5, 0.25, 0.0], missing={"amount", "rate"})
    assert [(r.reason, r.features) for r in reasons] == [
        ("Not provided: Credit amount, rate", ["amount", "rate"])
    ]


def test_an_all_null_application_is_never_given_reasons_of_values() -> None:
    """A schema that requires nothing decides an empty application: only "not provided"."""
    schema = small_schema(WITH_MISSING, duration="term", amount="size", rate="size")
    features = dict.fromkeys(schema.feature_names)
    reasons = decision_reasons(schema, DENY, [[0.25, 0.5, 0.125, 1.0]], features)
    assert [r.reason for r in reasons] == ["Credit amount not provided", "Not provided: duration"]


def test_a_missing_reason_no_null_can_call_for_is_refused() -> None:
    families = (
        ReasonFamily(name="term", reason="Duration of credit is long", missing_reason="Unknown"),
        FAMILIES[1],
    )
    schema = small_schema(families, duration="term", amount="size")
    document = schema.model_dump(mode="json")
    for feature in document["features"]:
        if feature["name"] == "duration":
            feature["nullable"] = False
    with pytest.raises(ValidationError, match="missing_reason but no nullable feature"):
        ModelSchema.model_validate(document)


def test_demo_denials_with_missing_values_say_so(model: LoadedModel) -> None:
    """Real applicants with optional features left null, decided and explained as a worker
    would: a reason is "not provided" exactly when its features were null."""
    schema = model.schema
    optional = [f.name for f in schema.features if f.nullable and f.family is not None]
    families = {family.name: family for family in schema.families}
    rows = german_rows(APPLICANTS)
    for i, row in enumerate(rows):
        for name in optional[i % 3 :: 3]:
            row[name] = None
    not_provided = 0
    for record in decided_and_explained(model, rows):
        for reason in record.reasons:
            nulls = [record.features[name] is None for name in reason.features]
            family = families[reason.family]
            if all(nulls):
                assert reason.reason == family.missing_reason
                not_provided += 1
            else:
                assert not any(nulls), reason
                assert reason.reason == family.reason
    assert not_provided >= 10


def test_the_demo_gives_a_missing_reason_wherever_a_null_can_be(model: LoadedModel) -> None:
    nullable = {f.family for f in model.schema.features if f.nullable and f.family is not None}
    for family in model.schema.families:
        assert (family.missing_reason is not None) == (family.name in nullable), family.name
