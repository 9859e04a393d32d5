"""Drift of a feature's distribution from its reference, and of the ranking of features.

The worker keeps histograms per model version, feature and day, of the attributions and of
the input values, on bin edges frozen in the version's reference: an underflow bin, the
reference's quantile bins, an overflow bin. Histograms merge by elementwise addition (days into
weeks, workers into one), so every figure here is computed from bin counts alone, never from
raw values: PSI, the Jensen-Shannon distance, a two-sample KS test on the binned CDFs, and the
nDCG of today's ranking of features by importance against the reference's ranking.

Pure functions over NumPy arrays: no I/O, nothing computed at import.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

Counts = npt.NDArray[np.int64]
Edges = npt.NDArray[np.float64]
_Floats = npt.NDArray[np.float64]

DEFAULT_BINS: Final = 20

# PSI's floor on each side's proportion of a bin. ln(q/p) is infinite for an empty bin, and a
# bin empty in the reference but not today is the common case of a real shift (today's values
# beyond the reference's range land in the overflow bin), so the floor caps its term at about
# q * ln(q / 1e-4): 0.1 of today's mass in a bin the reference left empty adds ~0.69, a strong
# signal, while one stray decision in 1,000 adds ~0.002. 1e-4 is the resolution of a reference
# of ~10,000 rows. A floor on proportions, not a pseudo-count added to every bin: bins empty on
# both sides then add exactly 0, so padding (see `histograms`) and unused bins change nothing,
# where a pseudo-count would move every proportion by the number of bins.
PSI_FLOOR: Final = 1e-4


def quantile_edges(values: npt.ArrayLike, bins: int = DEFAULT_BINS) -> Edges:
    """Edges of `bins` equal-frequency bins of a 1-D sample (the reference's values).

    Strictly increasing edges e_0 < ... < e_m, m <= bins: the lower edges of the quantile bins
    (the sample's quantiles at 0, 1/bins, ..., (bins-1)/bins, each an observed value, e_0 its
    minimum), then the float just above the sample's maximum. So every sample value falls in a
    quantile bin, and `histogram`'s underflow (< e_0) and overflow (>= e_m) bins hold only
    values outside the reference's range.

    Ties: quantiles falling on one value make one edge, so a tied feature gets fewer bins (all
    copies of a value land in one bin, since bins are half-open); a constant c gets [c, c+ulp],
    one bin holding exactly c. NaN (a missing input) and +-inf are left out; ValueError if
    nothing is left or `bins` < 1.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    sample = np.asarray(values, dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise ValueError("no finite values to take quantiles of")
    ordered = np.sort(sample)
    # Bin j opens at the sorted value of index floor(n * j / bins), the smallest x with
    # F(x) > j / bins: without ties each bin then holds floor(n * (j+1) / bins) - floor(n * j /
    # bins) values, as equal as they can be. Edges are observed values, never interpolated
    # between two, so a discrete feature's bins start at its values.
    lower = ordered[(np.arange(bins) * ordered.size) // bins]
    top = np.nextafter(ordered[-1], np.inf)
    return np.append(np.unique(lower), top).astype(np.float64)


def histogram(values: npt.ArrayLike, edges: npt.ArrayLike) -> Counts:
    """Counts of a 1-D `values` in len(edges) + 1 bins.

    Bin 0 is the underflow (< edges[0]), bin i is [edges[i-1], edges[i]), the last bin is the
    overflow (>= edges[-1]). NaN (a missing input) is in no bin, so the counts may sum to less
    than len(values); +-inf land in the underflow and overflow bins.
    """
    return _histogram(np.asarray(values, dtype=np.float64).ravel(), _checked_edges(edges))


def histograms(values: npt.ArrayLike, edges: Sequence[npt.ArrayLike]) -> Counts:
    """Per-feature histograms of a batch: `values` is (rows, features), `edges[j]` feature j's.

    Returns int64 counts of shape (features, width), width = the longest edges' length + 1.
    Row j's first len(edges[j]) + 1 entries are `histogram(values[:, j], edges[j])`; the rest
    are 0 (a feature with tied quantiles has fewer edges). Bins empty on both sides add nothing
    to PSI, JS or KS, so padded rows can be compared whole, as long as the reference's and
    today's rows were binned on the same edges.
    """
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(edges):
        raise ValueError(
            f"values must be (rows, {len(edges)} features) for {len(edges)} edge arrays, "
            f"got shape {matrix.shape}"
        )
    checked = [_checked_edges(feature_edges) for feature_edges in edges]
    width = max((len(feature_edges) for feature_edges in checked), default=0) + 1
    counts = np.zeros((len(checked), width), dtype=np.int64)
    # Column-major once, so each feature's column is contiguous for its searchsorted.
    columns = np.asfortranarray(matrix)
    for j, feature_edges in enumerate(checked):
        counts[j, : len(feature_edges) + 1] = _histogram(columns[:, j], feature_edges)
    return counts


def _histogram(values: _Floats, edges: Edges) -> Counts:
    values = values[~np.isnan(values)]
    # side="right": a value equal to an edge goes to the bin that edge opens, [e_i, e_i+1).
    index = np.searchsorted(edges, values, side="right")
    return np.bincount(index, minlength=len(edges) + 1).astype(np.int64, copy=False)


def _checked_edges(edges: npt.ArrayLike) -> Edges:
    array = np.asarray(edges, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"edges must be a non-empty 1-D array, got shape {array.shape}")
    if np.isnan(array).any() or not bool(np.all(np.diff(array) > 0)):
        raise ValueError("edges must be strictly increasing, without NaN")
    return array


def psi(reference: npt.ArrayLike, current: npt.ArrayLike, floor: float = PSI_FLOOR) -> float:
    """Population stability index of today's counts against the reference's, over the same bins.

    PSI = sum_i (q_i - p_i) * ln(q_i / p_i), p the reference's proportions, q today's, each
    raised to at least `floor` (see PSI_FLOOR; not renormalised after). Symmetric, 0 for equal
    proportions; 0.1 is the usual mark of a moderate shift, 0.2 of a significant one. Under no
    change it is biased upward by about (bins - 1) * (1/n_reference + 1/n_current).
    """
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    ref, cur = _counts_pair(reference, current)
    p = np.maximum(ref / ref.sum(), floor)
    q = np.maximum(cur / cur.sum(), floor)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Jensen-Shannon distance in base 2 (0 for equal proportions, 1 for disjoint supports).

    The square root of the JS divergence of the two normalised histograms, as
    scipy.spatial.distance.jensenshannon(p, q, base=2). Needs no floor: the mixture is positive
    wherever either side is, and empty bins add 0.
    """
    ref, cur = _counts_pair(reference, current)
    p = ref / ref.sum()
    q = cur / cur.sum()
    mixture = (p + q) / 2
    divergence = (_kl_base2(p, mixture) + _kl_base2(q, mixture)) / 2
    # Rounding can leave it a hair outside [0, 1].
    return math.sqrt(min(max(divergence, 0.0), 1.0))


def _kl_base2(p: _Floats, mixture: _Floats) -> float:
    support = p > 0
    return float(np.sum(p[support] * np.log2(p[support] / mixture[support])))


class KsResult(NamedTuple):
    statistic: float
    p_value: float


def ks_binned(reference: npt.ArrayLike, current: npt.ArrayLike) -> KsResult:
    """Two-sample Kolmogorov-Smirnov test from two histograms on the same bins.

    The statistic is max |F_ref - F_cur| over the bins' upper edges, F the empirical CDFs. The
    unbinned statistic is a maximum over every value, so this one is a lower bound of it (equal
    when each bin holds a single value); a shift inside one bin is invisible.

    The p-value is two-sided, at the effective sample size n = n1*n2 / (n1 + n2), from
    Kolmogorov's limiting distribution with Stephens' correction (see `ks_p_values`; close to
    scipy.stats.ks_2samp's method="asymp"). Binned (tied) data makes it conservative. The
    counts must be numbers of decisions, not weights.
    """
    ref, cur = _counts_pair(reference, current)
    n_ref = float(ref.sum())
    n_cur = float(cur.sum())
    statistic = float(np.max(np.abs(np.cumsum(ref) / n_ref - np.cumsum(cur) / n_cur)))
    effective_n = n_ref * n_cur / (n_ref + n_cur)
    p_value = float(ks_p_values(np.array([statistic]), np.array([effective_n]))[0])
    return KsResult(statistic, p_value)


# Terms of the Kolmogorov series: past 7 they are below 1e-20 where each form is used.
_SERIES_TERMS: Final = 7
# Below it, the series in exp(-(2k-1)^2 pi^2 / 8x^2) converges fast; above, the one in
# exp(-2 k^2 x^2) (Numerical Recipes' switch).
_SERIES_SWITCH: Final = 1.18


def ks_p_values(statistics: _Floats, effective_n: _Floats) -> _Floats:
    """Two-sided p-values of KS statistics at effective sample sizes n = n1*n2 / (n1 + n2):
    Kolmogorov's limiting distribution at (sqrt(n) + 0.12 + 0.11 / sqrt(n)) * D (Stephens'
    finite-sample correction), in NumPy. Against the exact distribution (scipy's kstwo) it is
    within 0.012 for n >= 100 (3% relative below p = 0.01) and within 0.023 for n >= 10. No
    scipy: it takes a second to import, which a gateway refreshing its gauges must not spend
    holding the interpreter."""
    n = np.maximum(np.asarray(effective_n, dtype=np.float64), 1.0)
    d = np.asarray(statistics, dtype=np.float64)
    root = np.sqrt(n)
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * d)


def kolmogorov_sf(x: _Floats) -> _Floats:
    """P(K > x) of the Kolmogorov distribution (scipy.special.kolmogorov), for arrays."""
    x = np.asarray(x, dtype=np.float64)
    k = np.arange(1, _SERIES_TERMS + 1, dtype=np.float64)[:, None]
    small = x < _SERIES_SWITCH
    # Each form where it converges; the other side gets a harmless stand-in value.
    low = np.where(small, np.maximum(x, 1e-3), 1.0)
    high = np.where(small, _SERIES_SWITCH, x)
    terms = np.exp(-((2 * k - 1) ** 2) * np.pi**2 / (8 * low**2))
    cdf = np.sqrt(2 * np.pi) / low * terms.sum(axis=0)
    signs = np.where(k % 2 == 1, 1.0, -1.0)
    tail = 2 * (signs * np.exp(-2 * k**2 * high**2)).sum(axis=0)
    return np.asarray(np.clip(np.where(small, 1.0 - cdf, tail), 0.0, 1.0), dtype=np.float64)


def _counts_pair(reference: npt.ArrayLike, current: npt.ArrayLike) -> tuple[_Floats, _Floats]:
    ref, cur = _same_bins(reference, current)
    if ref.sum() == 0 or cur.sum() == 0:
        raise ValueError("a histogram with no counts has no proportions")
    return ref, cur


def _same_bins(reference: npt.ArrayLike, current: npt.ArrayLike) -> tuple[_Floats, _Floats]:
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.ndim != 1 or ref.shape != cur.shape or ref.size == 0:
        raise ValueError(
            f"counts must be two 1-D arrays of the same bins, got {ref.shape} and {cur.shape}"
        )
    for counts in (ref, cur):
        if not bool(np.all(np.isfinite(counts))) or bool(np.any(counts < 0)):
            raise ValueError("counts must be finite and non-negative")
    return ref, cur


def ndcg(
    reference_importance: npt.ArrayLike, current_importance: npt.ArrayLike, k: int | None = None
) -> float:
    """nDCG of today's ranking of features against the reference's importance.

    Features are ranked by `current_importance`, descending; each earns its reference
    importance as graded relevance, discounted by 1 / log2(rank + 1), summed over the top `k`
    ranks (all when None), and divided by the same sum for the reference's own order. 1.0 when
    today's order is the reference's, lower as important features fall down the ranking.

    As sklearn.metrics.ndcg_score(y_true=[reference], y_score=[current], k=k) with its default
    ignore_ties=False: features tied in today's importance share the mean of their relevances
    over the ranks they span (the mean over the orders of the tie). A reference of all zeros
    gives 0.0, and negative reference importance is a ValueError, as sklearn. One difference:
    sklearn refuses a single feature; here it scores 1.0 (or 0.0 for zero importance).
    """
    relevance = np.asarray(reference_importance, dtype=np.float64)
    score = np.asarray(current_importance, dtype=np.float64)
    if relevance.ndim != 1 or relevance.shape != score.shape or relevance.size == 0:
        raise ValueError(
            f"importances must be two 1-D arrays over the same features, got {relevance.shape} "
            f"and {score.shape}"
        )
    if not (bool(np.all(np.isfinite(relevance))) and bool(np.all(np.isfinite(score)))):
        raise ValueError("importances must be finite")
    if bool(np.any(relevance < 0)):
        raise ValueError("reference importance must be non-negative (it is the relevance)")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    discount = 1.0 / np.log2(np.arange(relevance.size) + 2.0)
    if k is not None:
        discount[k:] = 0.0
    ideal = float(np.sort(relevance)[::-1] @ discount)
    if ideal == 0.0:
        return 0.0
    return _tie_averaged_dcg(relevance, score, np.cumsum(discount)) / ideal


def _tie_averaged_dcg(relevance: _Floats, score: _Floats, discount_cumsum: _Floats) -> float:
    # Groups of equal score, highest first; each group's mean relevance times the discounts of
    # the ranks it spans (McSherry & Najork 2008, as sklearn's _tie_averaged_dcg).
    _, group, sizes = np.unique(-score, return_inverse=True, return_counts=True)
    mean_relevance = np.zeros(len(sizes))
    np.add.at(mean_relevance, group, relevance)
    mean_relevance /= sizes
    last_rank = np.cumsum(sizes) - 1
    spanned = np.diff(discount_cumsum[last_rank], prepend=0.0)
    return float(np.sum(mean_relevance * spanned))


@dataclass(frozen=True, slots=True)
class DriftRule:
    """The service's rule for a feature drifting on a day (see `drifting`)."""

    min_decisions: int = 500
    psi_threshold: float = 0.2
    # Family-wise: split over the features compared (Bonferroni).
    ks_alpha: float = 0.01

    def __post_init__(self) -> None:
        if self.min_decisions < 0 or self.psi_threshold <= 0 or not 0 < self.ks_alpha < 1:
            raise ValueError(f"invalid drift rule {self}")


def drifting(
    rule: DriftRule, n_current: int, psi: float, ks_p_value: float, n_features: int
) -> bool:
    """Whether a feature drifts today, by the service's rule:

        n_current >= rule.min_decisions
        and psi >= rule.psi_threshold
        and ks_p_value < rule.ks_alpha / n_features   (Bonferroni over the features compared)

    Neither figure is enough alone. PSI is biased upward in small samples: with nothing
    changed it is about (bins - 1) * (1/n_reference + 1/n_current), so a day of 50 decisions on
    22 bins scores ~0.4, past 0.2. KS flags tiny shifts at large n: its critical statistic
    falls as 1/sqrt(n1*n2 / (n1 + n2)), so with 100,000 decisions on each side a CDF gap of 1%
    is "significant" at 0.01 / 20, though of no consequence. Requiring both asks for a shift
    that is large (PSI, an effect size) and not sampling noise (KS, evidence); Bonferroni keeps
    the chance that any feature of a null day passes KS under ks_alpha; the minimum n keeps a
    thin day from speaking. So a null day stays quiet and a real shift is loud. NaN figures
    (an empty side) never drift.
    """
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1, got {n_features}")
    return (
        n_current >= rule.min_decisions
        and psi >= rule.psi_threshold
        and ks_p_value < rule.ks_alpha / n_features
    )


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """A feature's drift today against the reference, as the gauges show it."""

    feature: str
    n_reference: int
    n_current: int
    psi: float
    js: float
    ks: float
    ks_p_value: float
    drifting: bool


def compare(
    feature: str,
    reference: npt.ArrayLike,
    current: npt.ArrayLike,
    rule: DriftRule,
    n_features: int,
) -> FeatureDrift:
    """A feature's figures and verdict from its reference and current counts on the same bins.

    A side with no counts (no decisions today, say) has no proportions: its figures are NaN
    and it does not drift.
    """
    ref, cur = _same_bins(reference, current)
    n_reference = int(ref.sum())
    n_current = int(cur.sum())
    if n_reference == 0 or n_current == 0:
        nan = math.nan
        return FeatureDrift(feature, n_reference, n_current, nan, nan, nan, nan, drifting=False)
    stability = psi(ref, cur)
    ks = ks_binned(ref, cur)
    return FeatureDrift(
        feature=feature,
        n_reference=n_reference,
        n_current=n_current,
        psi=stability,
        js=js_distance(ref, cur),
        ks=ks.statistic,
        ks_p_value=ks.p_value,
        drifting=drifting(rule, n_current, stability, ks.p_value, n_features),
    )


def compare_all(
    features: Sequence[str],
    reference: npt.ArrayLike,
    current: npt.ArrayLike,
    rule: DriftRule,
) -> list[FeatureDrift]:
    """`compare` for every feature at once: rows of `reference` and `current` (features x
    bins) are the features' histograms. The same figures, computed as arrays (a drift query
    compares 20 features over 31 spans)."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != cur.shape or ref.shape[0] != len(features):
        raise ValueError(f"counts must be features x bins alike, got {ref.shape} and {cur.shape}")
    n_ref, n_cur = ref.sum(axis=1), cur.sum(axis=1)
    usable = (n_ref > 0) & (n_cur > 0)
    safe_ref, safe_cur = np.where(n_ref > 0, n_ref, 1.0), np.where(n_cur > 0, n_cur, 1.0)
    p, q = ref / safe_ref[:, None], cur / safe_cur[:, None]
    pf, qf = np.maximum(p, PSI_FLOOR), np.maximum(q, PSI_FLOOR)
    stability = np.sum((qf - pf) * np.log(qf / pf), axis=1)
    mixture = (p + q) / 2
    divergence = (_kl_rows(p, mixture) + _kl_rows(q, mixture)) / 2
    js = np.sqrt(np.clip(divergence, 0.0, 1.0))
    ks = np.max(np.abs(np.cumsum(p, axis=1) - np.cumsum(q, axis=1)), axis=1)
    effective = np.where(usable, n_ref * n_cur / np.maximum(n_ref + n_cur, 1.0), 1.0)
    p_values = ks_p_values(ks, effective)
    out = []
    for i, feature in enumerate(features):
        if not usable[i]:
            nan = math.nan
            out.append(
                FeatureDrift(feature, int(n_ref[i]), int(n_cur[i]), nan, nan, nan, nan, False)
            )
            continue
        figures = (float(stability[i]), float(js[i]), float(ks[i]), float(p_values[i]))
        verdict = drifting(rule, int(n_cur[i]), figures[0], figures[3], len(features))
        out.append(FeatureDrift(feature, int(n_ref[i]), int(n_cur[i]), *figures, verdict))
    return out


def _kl_rows(p: _Floats, mixture: _Floats) -> _Floats:
    # Empty bins add 0 (the limit of p log p): masked, not computed.
    ratio = np.divide(p, mixture, out=np.ones_like(p), where=p > 0)
    return np.asarray(np.sum(p * np.log2(ratio), axis=1), dtype=np.float64)


def psi_all(reference: npt.ArrayLike, current: npt.ArrayLike) -> _Floats:
    """`psi` of each row (a feature's histogram) of two features x bins arrays; NaN for a row
    with no counts on either side."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    n_ref, n_cur = ref.sum(axis=1, keepdims=True), cur.sum(axis=1, keepdims=True)
    p = np.maximum(ref / np.where(n_ref > 0, n_ref, 1.0), PSI_FLOOR)
    q = np.maximum(cur / np.where(n_cur > 0, n_cur, 1.0), PSI_FLOOR)
    values = np.sum((q - p) * np.log(q / p), axis=1)
    return np.where((n_ref[:, 0] > 0) & (n_cur[:, 0] > 0), values, math.nan)
