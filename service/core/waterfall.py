"""A decision's waterfall (shap's convention) and the fixed axis of a model version.

The waterfall goes from the base value E[f(X)] to f(x) in margin space: one bar per feature,
sorted by |phi| (largest first), the rest summed into one "N other features" bar. Read from
the bottom up, the smallest bar starts at the base value and the largest ends at f(x).

The axis is fixed per model version, not per decision, so two decisions of one version can be
compared by eye: symmetric around the base value, wide enough for any margin the forest can
output (each tree's smallest and largest leaf summed; see `margin_bounds`).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.core.formats.base import Forest
from service.core.records import DecisionRecord
from service.core.schema import ModelSchema, Task

OTHER = "other"


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar: a feature's attribution (or the sum of the rest), and where it is drawn."""

    feature: str
    label: str
    value: float
    # The bar spans [start, end] on the axis, start + value == end.
    start: float
    end: float
    # The applicant's value as sent (None when absent, or for the grouped bar).
    shown_value: str | None


@dataclass(frozen=True, slots=True)
class Waterfall:
    output: str | None
    base: float
    # f(x) as the model scored it (the prediction's margin).
    fx: float
    bars: tuple[Bar, ...]
    axis_min: float
    axis_max: float


@dataclass(frozen=True, slots=True)
class Axis:
    """The fixed range of one output of a model version."""

    low: float
    high: float

    def around(self, base: float) -> tuple[float, float]:
        """Symmetric around `base`, covering [low, high], widened to a round step."""
        half = max(self.high - base, base - self.low, 1e-9)
        half = _round_up(half)
        return base - half, base + half


def margin_bounds(forest: Forest) -> list[Axis]:
    """Per output, the smallest and largest margin any input can get.

    Each tree adds one of its leaves; the sum of each tree's extreme leaves bounds the margin
    (tight for a single tree, a little loose for many, never too narrow).
    """
    low = np.array(forest.base, dtype=np.float64).copy()
    high = low.copy()
    leaves = forest.left < 0
    for tree in range(forest.n_trees):
        begin, end = forest.tree_ptr[tree], forest.tree_ptr[tree + 1]
        values = forest.value[begin:end][leaves[begin:end]]
        if values.size == 0:
            continue
        output = forest.tree_output[tree]
        low[output] += values.min() / forest.divisor
        high[output] += values.max() / forest.divisor
    return [Axis(float(lo), float(hi)) for lo, hi in zip(low, high, strict=True)]


def output_names(schema: ModelSchema) -> list[str | None]:
    """The outputs a record explains: one per class for multiclass, else one unnamed."""
    return list(schema.classes) if schema.task is Task.MULTICLASS else [None]


def waterfall(
    record: DecisionRecord, schema: ModelSchema, output: int, axis: Axis, max_bars: int
) -> Waterfall:
    """The waterfall of `output` of `record`, with at most `max_bars` bars in all."""
    names = schema.feature_names
    phi = record.attributions[output]
    base = record.base_value[output]
    order = sorted(range(len(names)), key=lambda i: (-abs(phi[i]), i))
    shown = order if len(order) <= max_bars else order[: max_bars - 1]
    rest = order[len(shown) :]
    items = [(names[i], names[i], phi[i], _shown(record.features, names[i])) for i in shown]
    if rest:
        label = f"{len(rest)} other features"
        items.append((OTHER, label, math.fsum(phi[i] for i in rest), None))
    axis_min, axis_max = axis.around(base)
    return Waterfall(
        output=output_names(schema)[output],
        base=base,
        fx=record.prediction.margins[output],
        bars=_stack(base, items),
        axis_min=axis_min,
        axis_max=axis_max,
    )


def _stack(base: float, items: Sequence[tuple[str, str, float, str | None]]) -> tuple[Bar, ...]:
    # Drawn bottom-up from the base value: the last item starts there.
    bars: list[Bar] = []
    position = base
    for feature, label, value, shown in reversed(items):
        bars.append(Bar(feature, label, value, position, position + value, shown))
        position += value
    return tuple(reversed(bars))


def _shown(features: Mapping[str, object], name: str) -> str | None:
    value = features.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _round_up(value: float) -> float:
    # To 1, 2 or 5 times a power of ten: tick labels stay short.
    power = 10.0 ** math.floor(math.log10(value))
    step = next((step for step in (1.0, 2.0, 2.5, 5.0) if value <= step * power), 10.0)
    return step * power
