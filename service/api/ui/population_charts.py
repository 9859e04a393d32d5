"""Chart geometry of the population page: global importance, the beeswarm-like strips of the
attribution histograms, and reason-family frequencies by day. Pixels from values, computed
here and drawn by templates/population.html; every number also sits in the DOM as a data
attribute (exact float64 reprs), for tests and tools.

Only stored aggregates are drawn (service/core/population): sums and histograms on a version's
frozen bin edges, never a record.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
from numpy.typing import NDArray

from service.api.ui.charts import (
    LABEL_WIDTH,
    PLOT_LEFT,
    PLOT_RIGHT,
    WIDTH,
    Tick,
    axis_ticks,
    cut_label,
)
from service.core.population.report import FeatureImportance, ReasonDay

# Feature names are cut to this many characters (the full name is in the tooltip and tables).
NAME_CHARS = 46

# Importance: a bar per feature, the reference's mean |phi| as a thin bar under it.
IMPORTANCE_ROW = 26
IMPORTANCE_TOP = 10
BAR_HEIGHT = 14
REFERENCE_GAP = 2
REFERENCE_HEIGHT = 5

# Beeswarm-like strips: the underflow bin's cell, the shared axis, the overflow bin's cell.
END_WIDTH = 18
END_GAP = 8
SWARM_LEFT = PLOT_LEFT + END_WIDTH + END_GAP
SWARM_RIGHT = PLOT_RIGHT - END_WIDTH - END_GAP
SWARM_ROW = 32
SWARM_TOP = 10
STRIP_HEIGHT = 16
REFERENCE_STRIP = 6
# Bins narrower than this (in pixels) are drawn together with their tiny neighbours on the
# same side of zero (the default grid's bins near zero are far below a pixel).
MIN_CELL_PX = 2.0
# The faintest opacity of a non-empty cell; the densest cell of a strip is opaque.
MIN_OPACITY = 0.1
# Only the most important features get a strip (all of them are in the importance chart).
MAX_SWARM_ROWS = 30

# Reason frequencies: one small panel per reason family, a share (0 to 100%) by day.
PANEL_WIDTH = 330
PANEL_HEIGHT = 132
PANEL_LEFT = 42
PANEL_RIGHT = 316
PANEL_TOP = 12
PANEL_BOTTOM = 102
# Longer windows draw their lines without a dot per day.
MAX_DOTTED_DAYS = 62

CountRow = NDArray[np.int64]
# A value's x on an axis.
XOf = Callable[[float], float]
EdgeRow = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ImportanceBar:
    feature: str
    text: str
    mean_abs: float
    mean: float
    std: float
    reference: float | None
    value_repr: str
    reference_repr: str
    y: float
    width: float
    reference_width: float | None
    text_x: float


@dataclass(frozen=True, slots=True)
class ImportanceChart:
    width: int
    height: int
    label_x: int
    plot_left: int
    plot_right: int
    axis_y: int
    bars: tuple[ImportanceBar, ...]
    ticks: tuple[Tick, ...]
    has_reference: bool


def importance_chart(
    rows: Sequence[FeatureImportance], reference: Mapping[str, float] | None
) -> ImportanceChart:
    """Mean |phi| per feature (as `rows` orders them, largest first), each beside the
    reference's, on one axis from 0."""
    values = [r.mean_abs for r in rows] + list((reference or {}).values())
    high = max(values, default=0.0) * 1.05 or 1.0
    scale = (PLOT_RIGHT - PLOT_LEFT) / high

    def x_of(value: float) -> float:
        return PLOT_LEFT + min(max(value, 0.0), high) * scale

    bars = []
    for row, r in enumerate(rows):
        y = IMPORTANCE_TOP + row * IMPORTANCE_ROW
        ref = reference.get(r.feature) if reference is not None else None
        width = x_of(r.mean_abs) - PLOT_LEFT
        bars.append(
            ImportanceBar(
                feature=r.feature,
                text=cut_label(r.feature, NAME_CHARS),
                mean_abs=r.mean_abs,
                mean=r.mean,
                std=r.std,
                reference=ref,
                value_repr=repr(r.mean_abs),
                reference_repr=repr(ref) if ref is not None else "",
                y=y,
                width=round(max(width, 1.0), 2),
                reference_width=(
                    round(max(x_of(ref) - PLOT_LEFT, 1.0), 2) if ref is not None else None
                ),
                text_x=round(PLOT_LEFT + max(width, 1.0) + 4, 2),
            )
        )
    axis_y = IMPORTANCE_TOP + len(rows) * IMPORTANCE_ROW + 4
    return ImportanceChart(
        width=WIDTH,
        height=axis_y + 24,
        label_x=LABEL_WIDTH,
        plot_left=PLOT_LEFT,
        plot_right=PLOT_RIGHT,
        axis_y=axis_y,
        bars=tuple(bars),
        ticks=axis_ticks(0.0, high, x_of),
        has_reference=reference is not None,
    )


@dataclass(frozen=True, slots=True)
class Cell:
    """Bins of one strip drawn as one rectangle (one bin, unless tiny ones were joined)."""

    x: float
    width: float
    # "pos" (red) or "neg" (blue): the side of zero the cell lies on; "zero" (grey) if it
    # holds zero.
    sign: str
    opacity: str
    count: int
    low_repr: str
    high_repr: str
    title: str


@dataclass(frozen=True, slots=True)
class Strip:
    # "window" or "reference".
    source: str
    y: float
    height: int
    n: int
    cells: tuple[Cell, ...]


@dataclass(frozen=True, slots=True)
class SwarmRow:
    feature: str
    text: str
    y: float
    window: Strip
    reference: Strip | None


@dataclass(frozen=True, slots=True)
class SwarmChart:
    width: int
    height: int
    label_x: int
    under_x: int
    over_x: int
    end_width: int
    plot_left: int
    plot_right: int
    axis_y: int
    zero_x: float
    axis_min_repr: str
    axis_max_repr: str
    rows: tuple[SwarmRow, ...]
    ticks: tuple[Tick, ...]
    # Features left out (beyond MAX_SWARM_ROWS).
    omitted: int


def swarm_chart(
    features: Sequence[str],
    window: Mapping[str, CountRow],
    reference: Mapping[str, CountRow] | None,
    edges: Mapping[str, EdgeRow],
) -> SwarmChart:
    """A row per feature (in the order given, at most MAX_SWARM_ROWS): the window's histogram
    of signed phi as a strip of cells on one axis, the reference's as a thin strip under it.

    A cell's opacity is the density of its bin (share of the strip's decisions per unit of phi,
    the densest cell of the strip opaque, on a square-root scale); the underflow and overflow
    bins, unbounded, are cells at the ends, shaded by their share. The axis spans the bins that
    hold a decision in either histogram, and zero.
    """
    shown = list(features[:MAX_SWARM_ROWS])
    low, high = _span(shown, window, reference, edges)
    scale = (SWARM_RIGHT - SWARM_LEFT) / (high - low)

    def x_of(value: float) -> float:
        return SWARM_LEFT + (min(max(value, low), high) - low) * scale

    rows = []
    for row, feature in enumerate(shown):
        y = SWARM_TOP + row * SWARM_ROW
        feature_edges = edges[feature]
        ref = reference.get(feature) if reference is not None else None
        rows.append(
            SwarmRow(
                feature=feature,
                text=cut_label(feature, NAME_CHARS),
                y=y,
                window=_strip("window", window[feature], feature_edges, x_of, y, STRIP_HEIGHT),
                reference=(
                    _strip(
                        "reference",
                        ref,
                        feature_edges,
                        x_of,
                        y + STRIP_HEIGHT + 3,
                        REFERENCE_STRIP,
                    )
                    if ref is not None
                    else None
                ),
            )
        )
    axis_y = SWARM_TOP + len(shown) * SWARM_ROW + 2
    return SwarmChart(
        width=WIDTH,
        height=axis_y + 40,
        label_x=LABEL_WIDTH,
        under_x=PLOT_LEFT,
        over_x=PLOT_RIGHT - END_WIDTH,
        end_width=END_WIDTH,
        plot_left=SWARM_LEFT,
        plot_right=SWARM_RIGHT,
        axis_y=axis_y,
        zero_x=round(x_of(0.0), 2),
        axis_min_repr=repr(low),
        axis_max_repr=repr(high),
        rows=tuple(rows),
        ticks=axis_ticks(low, high, x_of),
        omitted=max(len(features) - len(shown), 0),
    )


def _span(
    features: Sequence[str],
    window: Mapping[str, CountRow],
    reference: Mapping[str, CountRow] | None,
    edges: Mapping[str, EdgeRow],
) -> tuple[float, float]:
    # From the lowest to the highest edge of a bounded bin holding a decision, and zero.
    low, high = 0.0, 0.0
    for feature in features:
        feature_edges = edges[feature]
        hists = [window[feature]]
        if reference is not None and feature in reference:
            hists.append(reference[feature])
        for hist in hists:
            occupied = np.flatnonzero(hist[1 : len(feature_edges)])
            if occupied.size:
                low = min(low, float(feature_edges[occupied[0]]))
                high = max(high, float(feature_edges[occupied[-1] + 1]))
    if high - low <= 0.0:
        return -1.0, 1.0
    return low, high


def _strip(
    source: str,
    hist: CountRow,
    edges: EdgeRow,
    x_of: XOf,
    y: float,
    height: int,
) -> Strip:
    n = int(hist.sum())
    cells: list[Cell] = []
    if n == 0:
        return Strip(source, y, height, 0, ())
    groups = _groups(hist, edges, x_of)
    densest = max((count / (hi - lo) for lo, hi, count in groups if count), default=0.0)
    for lo, hi, count in groups:
        if not count:
            continue
        x, end = x_of(lo), x_of(hi)
        cells.append(
            Cell(
                x=round(x, 2),
                width=round(max(end - x, 1.0), 2),
                sign=_side(lo, hi),
                opacity=_opacity(math.sqrt((count / (hi - lo)) / densest)),
                count=count,
                low_repr=repr(lo),
                high_repr=repr(hi),
                title=f"{_decisions(source, count, n)}: φ in [{lo:.4g}, {hi:.4g})",
            )
        )
    under, over = int(hist[0]), int(hist[len(edges)])
    first, last = float(edges[0]), float(edges[-1])
    if under:
        cells.insert(
            0,
            Cell(
                x=PLOT_LEFT,
                width=END_WIDTH,
                sign="neg" if first <= 0.0 else "zero",
                opacity=_opacity(math.sqrt(under / n)),
                count=under,
                low_repr=repr(-math.inf),
                high_repr=repr(first),
                title=f"{_decisions(source, under, n)}: φ below {first:.4g}",
            ),
        )
    if over:
        cells.append(
            Cell(
                x=PLOT_RIGHT - END_WIDTH,
                width=END_WIDTH,
                sign="pos" if last > 0.0 else "zero",
                opacity=_opacity(math.sqrt(over / n)),
                count=over,
                low_repr=repr(last),
                high_repr=repr(math.inf),
                title=f"{_decisions(source, over, n)}: φ at or above {last:.4g}",
            )
        )
    return Strip(source, y, height, n, tuple(cells))


def _groups(hist: CountRow, edges: EdgeRow, x_of: XOf) -> list[tuple[float, float, int]]:
    # The bounded bins (1 .. len(edges) - 1), a run of sub-pixel neighbours on one side of zero
    # joined into one: (low edge, high edge, count).
    groups: list[tuple[float, float, int]] = []
    i = 1
    while i < len(edges):
        lo, hi, count = float(edges[i - 1]), float(edges[i]), int(hist[i])
        side = _side(lo, hi)
        while (
            x_of(hi) - x_of(lo) < MIN_CELL_PX
            and i + 1 < len(edges)
            and x_of(float(edges[i + 1])) - x_of(float(edges[i])) < MIN_CELL_PX
            and _side(float(edges[i]), float(edges[i + 1])) == side
        ):
            i += 1
            hi, count = float(edges[i]), count + int(hist[i])
        groups.append((lo, hi, count))
        i += 1
    return groups


def _side(low: float, high: float) -> str:
    # A bin holding zero may hold values of either sign: neither colour.
    return "zero" if low <= 0.0 < high else "pos" if low > 0.0 else "neg"


def _opacity(level: float) -> str:
    return f"{MIN_OPACITY + (1.0 - MIN_OPACITY) * min(max(level, 0.0), 1.0):.3f}"


def _decisions(source: str, count: int, n: int) -> str:
    return f"{'reference: ' if source == 'reference' else ''}{count} of {n} ({count / n:.1%})"


@dataclass(frozen=True, slots=True)
class ReasonPoint:
    day: date
    x: float
    y: float
    count: int
    denials: int
    value: float
    value_repr: str
    # Drawn as a dot: every day of a short window, else a day that no line reaches.
    dot: bool


@dataclass(frozen=True, slots=True)
class ReasonPanel:
    family: str
    reason: str
    total: int
    points: tuple[ReasonPoint, ...]
    # SVG polyline points, one line per run of consecutive days with denials.
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DayLabel:
    x: float
    label: str
    anchor: str


@dataclass(frozen=True, slots=True)
class ReasonCharts:
    width: int
    height: int
    plot_left: int
    plot_right: int
    top: int
    bottom: int
    panels: tuple[ReasonPanel, ...]
    # Gridlines at 0, 50 and 100%.
    levels: tuple[Tick, ...]
    days: tuple[DayLabel, ...]
    # A short mark under each day of a short window.
    day_marks: tuple[float, ...]


def reason_charts(
    window: Sequence[date], rows: Sequence[ReasonDay], reasons: Mapping[str, str]
) -> ReasonCharts:
    """A panel per reason family given in the window (most given first): by day, the share of
    the day's denials that gave it. Days without denials have no point (the line breaks)."""
    first, last = window[0], window[-1]
    span = (last - first).days

    def x_of(day: date) -> float:
        if span == 0:
            return (PANEL_LEFT + PANEL_RIGHT) / 2
        return PANEL_LEFT + (day - first).days / span * (PANEL_RIGHT - PANEL_LEFT)

    def y_of(share: float) -> float:
        return PANEL_BOTTOM - share * (PANEL_BOTTOM - PANEL_TOP)

    totals: dict[str, int] = {}
    for row in rows:
        for family, count in row.families.items():
            totals[family] = totals.get(family, 0) + count
    ordered = sorted(totals, key=lambda family: (-totals[family], family))
    with_denials = [row for row in rows if row.denials]
    runs = _runs([row.day for row in with_denials])
    dotted = span < MAX_DOTTED_DAYS
    alone = {run[0] for run in runs if len(run) == 1}
    panels = []
    for family in ordered:
        points = {}
        for row in with_denials:
            count = row.families.get(family, 0)
            value = count / row.denials
            points[row.day] = ReasonPoint(
                day=row.day,
                x=round(x_of(row.day), 2),
                y=round(y_of(value), 2),
                count=count,
                denials=row.denials,
                value=value,
                value_repr=repr(value),
                dot=dotted or row.day in alone,
            )
        lines = tuple(
            " ".join(f"{points[day].x},{points[day].y}" for day in run)
            for run in runs
            if len(run) > 1
        )
        panels.append(
            ReasonPanel(
                family=family,
                reason=reasons.get(family, ""),
                total=totals[family],
                points=tuple(points.values()),
                lines=lines,
            )
        )
    labels = [DayLabel(PANEL_LEFT, first.isoformat(), "start")]
    if span:
        labels.append(DayLabel(PANEL_RIGHT, last.isoformat(), "end"))
    else:
        labels = [DayLabel((PANEL_LEFT + PANEL_RIGHT) / 2, first.isoformat(), "middle")]
    return ReasonCharts(
        width=PANEL_WIDTH,
        height=PANEL_HEIGHT,
        plot_left=PANEL_LEFT,
        plot_right=PANEL_RIGHT,
        top=PANEL_TOP,
        bottom=PANEL_BOTTOM,
        panels=tuple(panels),
        levels=tuple(Tick(round(y_of(share), 2), f"{share:.0%}") for share in (0.0, 0.5, 1.0)),
        days=tuple(labels),
        day_marks=tuple(round(x_of(day), 2) for day in window) if dotted else (),
    )


def _runs(days: Sequence[date]) -> list[list[date]]:
    # Consecutive days joined; a day without denials (or decisions) breaks the line.
    runs: list[list[date]] = []
    for day in days:
        if runs and (day - runs[-1][-1]).days == 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs
