"""The waterfall of a decision and the fixed axis of a model version (service/core/waterfall)."""

import pytest

from service.core.registry import LoadedModel
from service.core.schema import Feature, FeatureType, ModelSchema, Task
from service.core.waterfall import OTHER, Axis, margin_bounds, waterfall
from tests.api_client import MODELS, german_rows
from tests.store_contract import CLASSES, FEATURES, binary_record, multiclass_record


def schema_of(task: Task, classes: tuple[str, ...] = ()) -> ModelSchema:
    """A schema naming the contract records' features (their inputs are not encoded here)."""
    features = tuple(Feature(name=name, type=FeatureType.NUMERIC) for name in FEATURES)
    rule: dict[str, object] = {"decision": {}} if task is Task.BINARY else {}
    return ModelSchema.model_validate(
        {"name": "m", "task": task, "features": features, "classes": classes, **rule}
    )


@pytest.mark.parametrize("name", ["german-credit", "german-credit-lightgbm"])
def test_every_margin_of_real_applicants_is_inside_the_bounds(name: str) -> None:
    model = LoadedModel.from_directory(MODELS / name)
    (bounds,) = margin_bounds(model.forest())
    margins = model.predict_margins(model.encode_many(german_rows(200)))
    assert bounds.low <= margins.min()
    assert margins.max() <= bounds.high
    # Not so loose as to be useless: within a few times the observed spread.
    assert bounds.high - bounds.low < 10 * (margins.max() - margins.min())


def test_bars_are_sorted_by_size_and_the_rest_grouped_into_one() -> None:
    record = binary_record(seed=5)
    chart = waterfall(record, schema_of(Task.BINARY), 0, Axis(-10.0, 10.0), max_bars=2)
    phi = record.attributions[0]
    largest = max(range(len(phi)), key=lambda i: abs(phi[i]))
    assert [bar.feature for bar in chart.bars] == [FEATURES[largest], OTHER]
    assert chart.bars[1].label == f"{len(phi) - 1} other features"
    assert chart.bars[1].value == pytest.approx(sum(phi) - phi[largest], abs=1e-12)


def test_bars_stack_from_the_base_value_to_the_sum() -> None:
    record = multiclass_record()
    schema = schema_of(Task.MULTICLASS, CLASSES)
    for output in range(3):
        chart = waterfall(record, schema, output, Axis(-5.0, 5.0), max_bars=10)
        assert chart.output == schema.classes[output]
        assert chart.bars[-1].start == record.base_value[output]
        for upper, lower in zip(chart.bars, chart.bars[1:], strict=False):
            assert upper.start == pytest.approx(lower.end, abs=1e-12)
        assert chart.bars[0].end == pytest.approx(
            record.base_value[output] + sum(record.attributions[output]), abs=1e-9
        )


def test_the_axis_is_symmetric_around_the_base_and_covers_the_bounds() -> None:
    low, high = Axis(-9.4, 8.7).around(-0.835)
    assert high - (-0.835) == pytest.approx(-0.835 - low)
    assert low <= -9.4
    assert high >= 8.7
