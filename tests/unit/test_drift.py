"""Drift figures from bin counts (service/core/population/drift): PSI, JS, KS, nDCG, the rule."""

import math

import numpy as np
import numpy.typing as npt
import pytest
from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]
from scipy.special import kolmogorov  # type: ignore[import-untyped]
from scipy.stats import ks_2samp  # type: ignore[import-untyped]
from sklearn.metrics import ndcg_score

from service.core.population.drift import (
    PSI_FLOOR,
    DriftRule,
    compare,
    compare_all,
    drifting,
    histogram,
    histograms,
    js_distance,
    kolmogorov_sf,
    ks_binned,
    ndcg,
    psi,
    psi_all,
    quantile_edges,
)

N_FEATURES = 20

# Reference and today's counts over underflow + 4 bins + overflow, with bins empty on one side
# or both (the floor's cases).
REFERENCE = np.array([0, 120, 300, 380, 200, 0])
CURRENT = np.array([3, 90, 310, 300, 247, 50])


def psi_by_formula(reference: npt.ArrayLike, current: npt.ArrayLike, floor: float) -> float:
    p = np.asarray(reference, dtype=float)
    q = np.asarray(current, dtype=float)
    p = np.where(p / p.sum() < floor, floor, p / p.sum())
    q = np.where(q / q.sum() < floor, floor, q / q.sum())
    return float(sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q, strict=True)))


def test_psi_of_two_bins_by_hand() -> None:
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    expected = 0.25 * math.log(2) + 0.25 * math.log(1.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("floor", [PSI_FLOOR, 1e-6, 0.01])
def test_psi_is_the_formula_with_floored_proportions(floor: float) -> None:
    assert psi(REFERENCE, CURRENT, floor) == pytest.approx(
        psi_by_formula(REFERENCE, CURRENT, floor), rel=1e-12
    )
    # The bin empty on both sides adds nothing; the one empty only in the reference is capped.
    assert psi(np.append(REFERENCE, 0), np.append(CURRENT, 0), floor) == pytest.approx(
        psi(REFERENCE, CURRENT, floor), rel=1e-12
    )


def test_psi_is_zero_for_equal_proportions_and_symmetric() -> None:
    assert psi(REFERENCE, 3 * REFERENCE) == 0.0
    assert psi(REFERENCE, CURRENT) == pytest.approx(psi(CURRENT, REFERENCE), rel=1e-12)


def test_psi_and_ks_refuse_mismatched_or_empty_counts() -> None:
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no counts"):
        ks_binned([0, 0, 0], [1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        js_distance([1, -1, 3], [1, 2, 3])


def test_js_distance_is_scipys_jensenshannon_in_base_2() -> None:
    rng = np.random.default_rng(3)
    cases: list[tuple[npt.ArrayLike, npt.ArrayLike]] = [
        (REFERENCE, CURRENT),
        ([1, 0, 0], [0, 0, 1]),
        (REFERENCE, REFERENCE),
    ]
    cases += [(rng.integers(0, 50, 22), rng.integers(0, 50, 22)) for _ in range(20)]
    for reference, current in cases:
        p = np.asarray(reference) / np.sum(reference)
        q = np.asarray(current) / np.sum(current)
        assert js_distance(reference, current) == pytest.approx(
            jensenshannon(p, q, base=2), abs=1e-12
        )
    assert js_distance([1, 0, 0], [0, 0, 1]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("n_ref", "n_cur", "seed"), [(2000, 1000, 0), (700, 700, 1), (50, 3000, 2), (60, 90, 3)]
)
def test_ks_on_values_at_bin_points_is_ks_2samp(n_ref: int, n_cur: int, seed: int) -> None:
    # Integer values, one per bin [i, i + 1): binning loses nothing, so the statistic is
    # ks_2samp's, and the p-value near its method="asymp" (Stephens' corrected limiting
    # distribution: within 5% from n = 100 on, within 0.03 below).
    rng = np.random.default_rng(seed)
    reference = rng.poisson(4.0, n_ref).astype(float)
    current = rng.poisson(4.4, n_cur).astype(float)
    edges = np.arange(0.0, max(reference.max(), current.max()) + 1)
    result = ks_binned(histogram(reference, edges), histogram(current, edges))
    expected = ks_2samp(reference, current, method="asymp")
    assert result.statistic == pytest.approx(expected.statistic, abs=1e-12)
    if n_ref * n_cur / (n_ref + n_cur) < 100:
        assert result.p_value == pytest.approx(expected.pvalue, abs=0.03)
    else:
        assert result.p_value == pytest.approx(expected.pvalue, rel=0.05, abs=1e-6)


def test_the_kolmogorov_series_is_scipys() -> None:
    x = np.linspace(0.0, 4.0, 401)
    np.testing.assert_allclose(kolmogorov_sf(x), kolmogorov(x), rtol=1e-12, atol=1e-15)


def test_all_features_at_once_are_each_compared() -> None:
    rng = np.random.default_rng(8)
    reference = rng.integers(0, 50, (6, 9))
    current = rng.integers(0, 50, (6, 9))
    current[2] = 0  # no decisions for one feature: NaN figures, never drifting
    features = [f"f{i}" for i in range(6)]
    rule = DriftRule(min_decisions=10)
    together = compare_all(features, reference, current, rule)
    for i, got in enumerate(together):
        alone = compare(features[i], reference[i], current[i], rule, len(features))
        for name in ("psi", "js", "ks", "ks_p_value"):
            a, b = getattr(got, name), getattr(alone, name)
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12), name
        assert (got.drifting, got.n_current, got.n_reference) == (
            alone.drifting,
            alone.n_current,
            alone.n_reference,
        )
    np.testing.assert_allclose(
        psi_all(reference, current)[[0, 1, 3, 4, 5]],
        [psi(reference[i], current[i]) for i in (0, 1, 3, 4, 5)],
        rtol=1e-12,
    )


def test_binned_ks_is_a_lower_bound_of_the_unbinned_statistic() -> None:
    rng = np.random.default_rng(4)
    reference = rng.normal(size=3000)
    edges = quantile_edges(reference)
    for shift in (0.0, 0.05, 0.3):
        current = rng.normal(shift, 1.0, 1500)
        binned = ks_binned(histogram(reference, edges), histogram(current, edges)).statistic
        assert binned <= ks_2samp(reference, current).statistic + 1e-12


def test_ks_of_identical_proportions_is_zero_with_p_value_one() -> None:
    assert ks_binned(REFERENCE, 2 * REFERENCE) == (0.0, 1.0)


def test_ndcg_is_sklearns_ndcg_score() -> None:
    rng = np.random.default_rng(5)
    for trial in range(50):
        n = int(rng.integers(2, 25))
        reference = rng.exponential(size=n)
        current = reference * rng.lognormal(0.0, 0.5, n)
        if trial % 3 == 1:
            current = np.round(current, 1)  # ties in today's ranking
        if trial % 3 == 2:
            reference = np.round(reference)  # ties and zeros in the relevance
        for k in (None, 1, 3, n):
            assert ndcg(reference, current, k) == pytest.approx(
                ndcg_score([reference], [current], k=k), rel=1e-12, abs=1e-15
            ), (trial, k)


def test_ndcg_is_one_for_the_same_order_and_lower_when_it_changes() -> None:
    reference = np.array([0.9, 0.5, 0.3, 0.1])
    assert ndcg(reference, reference / 2) == pytest.approx(1.0)
    assert ndcg(reference, reference[::-1]) < 0.9
    assert ndcg(np.zeros(4), reference) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        ndcg([-1.0, 2.0], [1.0, 2.0])


def test_quantile_edges_give_equal_bins_and_empty_outer_bins_on_the_reference() -> None:
    reference = np.random.default_rng(6).lognormal(size=4000)
    edges = quantile_edges(reference, bins=20)
    assert len(edges) == 21
    assert bool(np.all(np.diff(edges) > 0))
    counts = histogram(reference, edges)
    assert counts[0] == 0
    assert counts[-1] == 0
    assert set(counts[1:-1].tolist()) == {200}


def test_quantile_edges_of_tied_and_constant_features() -> None:
    binary = np.r_[np.zeros(700), np.ones(300)]
    edges = quantile_edges(binary)
    assert edges[:2].tolist() == [0.0, 1.0]
    assert len(edges) == 3
    assert histogram(binary, edges).tolist() == [0, 700, 300, 0]
    constant = quantile_edges(np.full(50, 2.5))
    assert constant[0] == 2.5
    assert constant[1] == np.nextafter(2.5, np.inf)
    assert histogram([2.0, 2.5, 2.5, 3.0], constant).tolist() == [1, 2, 1]
    # Missing values are not quantiles; nothing but missing is an error.
    assert quantile_edges([np.nan, 1.0, 2.0, np.inf], bins=2).tolist()[:2] == [1.0, 2.0]
    with pytest.raises(ValueError, match="no finite values"):
        quantile_edges([np.nan])


def test_histogram_bins_are_half_open_with_underflow_and_overflow() -> None:
    edges = np.array([0.0, 1.0, 2.0])
    values = [-np.inf, -0.5, 0.0, 0.5, 1.0, 1.999, 2.0, 7.0, np.inf, np.nan]
    assert histogram(values, edges).tolist() == [2, 2, 2, 3]
    with pytest.raises(ValueError, match="strictly increasing"):
        histogram(values, [0.0, 0.0, 1.0])


def test_histograms_of_a_batch_are_per_feature_histograms_padded() -> None:
    rng = np.random.default_rng(7)
    values = np.column_stack([rng.normal(size=500), rng.integers(0, 2, 500), np.full(500, 1.0)])
    values[rng.random(500) < 0.1, 0] = np.nan
    edges = [quantile_edges(values[:, j]) for j in range(3)]
    counts = histograms(values, edges)
    assert counts.shape == (3, 22)
    assert counts.dtype == np.int64
    for j, feature_edges in enumerate(edges):
        width = len(feature_edges) + 1
        assert counts[j, :width].tolist() == histogram(values[:, j], feature_edges).tolist()
        assert not counts[j, width:].any()
    # Merging is addition: two halves binned apart sum to the whole.
    halves = histograms(values[:250], edges) + histograms(values[250:], edges)
    assert (halves == counts).all()


def sample_features(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    """Twenty features of varied shapes, as attributions come: skewed, tied, mostly zero."""
    columns = []
    for j in range(N_FEATURES):
        kind = j % 5
        if kind == 0:
            column = rng.normal(0.3, 1.0, n)
        elif kind == 1:
            column = rng.lognormal(0.0, 1.0, n)
        elif kind == 2:
            column = rng.poisson(3.0, n).astype(float)
        elif kind == 3:
            column = np.where(rng.random(n) < 0.6, 0.0, rng.normal(0.0, 0.2, n))
        else:
            column = rng.standard_t(3, n)
        columns.append(column)
    return np.column_stack(columns)


def drift_of(reference: npt.NDArray[np.float64], current: npt.NDArray[np.float64]) -> list[bool]:
    edges = [quantile_edges(reference[:, j]) for j in range(N_FEATURES)]
    reference_counts = histograms(reference, edges)
    current_counts = histograms(current, edges)
    return [
        compare(f"f{j}", reference_counts[j], current_counts[j], DriftRule(), N_FEATURES).drifting
        for j in range(N_FEATURES)
    ]


@pytest.mark.parametrize("seed", range(8))
def test_a_null_day_flags_no_feature(seed: int) -> None:
    rng = np.random.default_rng(seed)
    reference = sample_features(rng, 2000)
    current = sample_features(rng, 1000)
    assert drift_of(reference, current) == [False] * N_FEATURES


@pytest.mark.parametrize("seed", range(8))
def test_a_feature_doubled_flags_alone(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    reference = sample_features(rng, 2000)
    current = sample_features(rng, 1000)
    current[:, 0] *= 2
    assert drift_of(reference, current) == [True] + [False] * (N_FEATURES - 1)


def test_a_small_day_never_drifts_though_its_psi_is_high() -> None:
    rng = np.random.default_rng(9)
    reference = rng.normal(size=5000)
    edges = quantile_edges(reference)
    # 60 decisions from the same distribution: PSI's small-sample bias alone nears 0.2.
    result = compare(
        "x", histogram(reference, edges), histogram(rng.normal(size=60), edges), DriftRule(), 1
    )
    assert result.n_current == 60
    assert not result.drifting


def test_the_rule_needs_decisions_psi_and_a_bonferroni_ks() -> None:
    rule = DriftRule()
    assert drifting(rule, 500, 0.2, 0.0004, 20)
    assert not drifting(rule, 499, 0.2, 0.0004, 20)
    assert not drifting(rule, 500, 0.199, 0.0004, 20)
    # 0.01 / 20 = 0.0005: significant for one feature, not for twenty.
    assert not drifting(rule, 500, 0.2, 0.0005, 20)
    assert drifting(rule, 500, 0.2, 0.0005, 1)
    assert not drifting(rule, 10_000, math.nan, 0.0, 1)
    with pytest.raises(ValueError, match="n_features"):
        drifting(rule, 500, 0.2, 0.0, 0)


def test_compare_of_an_empty_day_is_nan_and_quiet() -> None:
    result = compare("x", REFERENCE, np.zeros_like(REFERENCE), DriftRule(), 3)
    assert (result.n_reference, result.n_current, result.drifting) == (1000, 0, False)
    assert math.isnan(result.psi)
    assert math.isnan(result.ks_p_value)


def test_compare_reports_each_figure() -> None:
    result = compare("age", REFERENCE, CURRENT, DriftRule(min_decisions=1), 3)
    assert result.feature == "age"
    assert (result.n_reference, result.n_current) == (1000, 1000)
    assert result.psi == psi(REFERENCE, CURRENT)
    assert result.js == js_distance(REFERENCE, CURRENT)
    assert (result.ks, result.ks_p_value) == ks_binned(REFERENCE, CURRENT)
    assert result.drifting == drifting(
        DriftRule(min_decisions=1), 1000, result.psi, result.ks_p_value, 3
    )
