"""Adverse-action reasons and the protected share, on the demo model and real applicants."""

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from service.core.engine.pred_contribs import PredContribs
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


@pytest.fixture(scope="module")
def records(model: LoadedModel) -> list[DecisionRecord]:
    """Real applicants decided and explained as the gateway and a worker would."""
    events = [
        DecisionEvent(
            transaction_id=f"txn-{i}",
            model=ModelRef(name=model.name, version=model.version),
            features=row,
            prediction=model.predict(row),
            decided_at=DECIDED,
        )
        for i, row in enumerate(german_rows(APPLICANTS))
    ]
    result = explain_batch(model, PredContribs(model.booster), events, DECIDED)
    assert result.failures == []
    return result.records


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
