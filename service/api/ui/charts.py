"""Chart geometry for the console's SVG: pixels from values, computed here, drawn by templates.

Charts are server-rendered SVG (no chart library, no script): they print, they work with
scripts off, and their numbers sit in the DOM as data attributes for tests and tools.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from service.core.waterfall import OTHER, Waterfall

WIDTH = 1000
LABEL_WIDTH = 330
PLOT_LEFT = LABEL_WIDTH + 10
PLOT_RIGHT = WIDTH - 80
PLOT_WIDTH = PLOT_RIGHT - PLOT_LEFT
ROW_HEIGHT = 28
TOP = 34
BAR_HEIGHT = 18
# About this many ticks on the axis, at round values.
TICKS = 6
# Longer "feature = value" labels are cut (the full text is in the bar's tooltip and the table).
LABEL_CHARS = 44


@dataclass(frozen=True, slots=True)
class BarShape:
    feature: str
    label: str
    shown_value: str | None
    # "label = value", cut to fit, and in full.
    text: str
    full_text: str
    value: float
    # Python's repr: the exact float64, for tests and tools reading the DOM.
    value_repr: str
    x: float
    y: float
    width: float
    # "up" pushes the margin up (toward denial for a credit model), "down" the other way.
    direction: str
    # Cut at the axis' edge (the bar goes on beyond it).
    clipped: bool
    text_x: float
    text_anchor: str
    is_other: bool


@dataclass(frozen=True, slots=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True, slots=True)
class WaterfallChart:
    waterfall: Waterfall
    height: int
    width: int
    label_x: int
    plot_left: int
    plot_right: int
    bars: tuple[BarShape, ...]
    ticks: tuple[Tick, ...]
    base_x: float
    fx_x: float
    # The decision threshold's margin on the axis, when the model has one and it is in range.
    threshold_x: float | None
    base_repr: str
    fx_repr: str
    axis_min_repr: str
    axis_max_repr: str


def waterfall_chart(chart: Waterfall, threshold_margin: float | None) -> WaterfallChart:
    """Where each bar of `chart` is drawn, on its fixed axis."""
    scale = PLOT_WIDTH / (chart.axis_max - chart.axis_min)

    def x_of(value: float) -> float:
        clamped = min(max(value, chart.axis_min), chart.axis_max)
        return PLOT_LEFT + (clamped - chart.axis_min) * scale

    bars = []
    for row, bar in enumerate(chart.bars):
        left, right = sorted((bar.start, bar.end))
        x, end = x_of(left), x_of(right)
        up = bar.value >= 0
        bars.append(
            BarShape(
                feature=bar.feature,
                label=bar.label,
                shown_value=bar.shown_value,
                text=cut_label(_text(bar.label, bar.shown_value)),
                full_text=_text(bar.label, bar.shown_value),
                value=bar.value,
                value_repr=repr(bar.value),
                x=round(x, 2),
                y=TOP + row * ROW_HEIGHT,
                width=round(max(end - x, 1.0), 2),
                direction="up" if up else "down",
                clipped=left < chart.axis_min or right > chart.axis_max,
                text_x=round(end + 4 if up else x - 4, 2),
                text_anchor="start" if up else "end",
                is_other=bar.feature == OTHER,
            )
        )
    in_range = threshold_margin is not None and (
        chart.axis_min <= threshold_margin <= chart.axis_max
    )
    return WaterfallChart(
        waterfall=chart,
        height=TOP + len(bars) * ROW_HEIGHT + 40,
        width=WIDTH,
        label_x=LABEL_WIDTH,
        plot_left=PLOT_LEFT,
        plot_right=PLOT_RIGHT,
        bars=tuple(bars),
        ticks=axis_ticks(chart.axis_min, chart.axis_max, x_of),
        base_x=round(x_of(chart.base), 2),
        fx_x=round(x_of(chart.fx), 2),
        threshold_x=(
            round(x_of(threshold_margin), 2) if in_range and threshold_margin is not None else None
        ),
        base_repr=repr(chart.base),
        fx_repr=repr(chart.fx),
        axis_min_repr=repr(chart.axis_min),
        axis_max_repr=repr(chart.axis_max),
    )


def axis_ticks(low: float, high: float, x_of: Callable[[float], float]) -> tuple[Tick, ...]:
    # Round values (multiples of 1, 2 or 5 times a power of ten) inside the axis.
    rough = (high - low) / TICKS
    power = 10.0 ** math.floor(math.log10(rough))
    step = next((s * power for s in (1.0, 2.0, 5.0) if rough <= s * power), 10.0 * power)
    first = math.ceil(low / step)
    values = [k * step for k in range(first, math.floor(high / step) + 1)]
    return tuple(Tick(round(x_of(value), 2), short_number(value)) for value in values)


def _text(label: str, shown_value: str | None) -> str:
    return label if shown_value is None else f"{label} = {shown_value}"


def cut_label(text: str, chars: int = LABEL_CHARS) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def short_number(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-9 else "0"


def threshold_margin(probability: float | None) -> float | None:
    """The margin (log-odds) at which a binary model's probability crosses `probability`."""
    if probability is None or not 0.0 < probability < 1.0:
        return None
    return math.log(probability / (1.0 - probability))
