"""bench.stats against independent references (scipy.stats, brute force, hand examples)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as st

from markbench import stats


# ---------------------------------------------------------------------------------------------------------------
# Binomial p-values and thresholds
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 32, 48, 100])
def test_binomial_pvalue_matches_scipy_sf(n):
    for k in range(0, n + 2):
        ref = st.binom.sf(k - 1, n, 0.5)  # P(X >= k)
        assert stats.binomial_pvalue(k, n) == pytest.approx(ref, rel=1e-12, abs=0)
        assert isinstance(stats.binomial_pvalue(k, n), float)
    ks = np.arange(n + 1)
    np.testing.assert_allclose(stats.binomial_pvalue(ks, n), st.binom.sf(ks - 1, n, 0.5), rtol=1e-12)


def test_binomial_pvalue_exact_values_48_bits():
    # Exact: P(X >= k) = sum_{j >= k} C(48, j) / 2^48
    for k in (0, 24, 40, 41, 48):
        exact = Fraction(sum(math.comb(48, j) for j in range(k, 49)), 2**48)
        assert stats.binomial_pvalue(k, 48) == pytest.approx(float(exact), rel=1e-12)
    assert stats.binomial_pvalue(41, 48) == pytest.approx(3.12e-7, rel=1e-2)
    assert stats.binomial_pvalue(40, 48) == pytest.approx(1.65e-6, rel=1e-2)
    assert stats.binomial_pvalue(0, 48) == 1.0


def test_log10_pvalue():
    ks = np.arange(49)
    np.testing.assert_allclose(stats.log10_binomial_pvalue(ks, 48), np.log10(st.binom.sf(ks - 1, 48, 0.5)),
                               rtol=1e-10, atol=1e-12)
    assert stats.log10_binomial_pvalue(48, 48) == pytest.approx(-48 * math.log10(2))
    assert stats.log10_binomial_pvalue(0, 48) == 0.0
    assert stats.log10_binomial_pvalue(49, 48) == -math.inf
    assert isinstance(stats.log10_binomial_pvalue(30, 48), float)
    # no underflow for long messages: P(X >= 2000 of 2000) = 2^-2000
    assert stats.log10_binomial_pvalue(2000, 2000) == pytest.approx(-2000 * math.log10(2), rel=1e-9)


def test_bit_threshold_48_bits_at_1e6_is_41():
    assert stats.bit_threshold(48, 1e-6) == 41


def _brute_threshold(n, fpr):
    """Exact brute force: P(X >= tau) as a fraction of 2^n equally likely strings."""
    for tau in range(0, n + 1):
        if Fraction(sum(math.comb(n, j) for j in range(tau, n + 1)), 2**n) <= Fraction(fpr):
            return tau
    return n + 1


@pytest.mark.parametrize("fpr", [0.5, 0.1, 0.05, 1e-2, 1e-3, 1e-4, 1e-6, 1e-9, 1e-12, 1e-20])
def test_bit_threshold_brute_force(fpr):
    for n in range(0, 90):
        tau = stats.bit_threshold(n, fpr)
        assert tau == _brute_threshold(n, fpr), (n, fpr)
        # the defining property, against scipy (skipping exact ties such as P(X >= 18 of 35) = 0.5, where the
        # floating-point sf may land on either side)
        if tau <= n and not math.isclose(st.binom.sf(tau - 1, n, 0.5), fpr, rel_tol=1e-9):
            assert st.binom.sf(tau - 1, n, 0.5) <= fpr
        if tau >= 1 and not math.isclose(st.binom.sf(tau - 2, n, 0.5), fpr, rel_tol=1e-9):
            assert st.binom.sf(tau - 2, n, 0.5) > fpr


def test_bit_threshold_exact_tie():
    # n odd: P(X >= (n+1)/2) = 1/2 exactly, so at fpr = 0.5 tau = (n+1)/2
    assert stats.bit_threshold(35, 0.5) == 18
    assert stats.bit_threshold(35, 0.4999999) == 19


def test_bit_threshold_edges():
    assert stats.bit_threshold(10, 1e-6) == 11  # 2^-10 > 1e-6: nothing can be detected
    assert stats.bit_threshold(10, 0.0) == 11
    assert stats.bit_threshold(10, 1.0) == 0
    assert stats.bit_threshold(20, 2.0**-20) == 20  # exactly at the boundary: <= holds
    assert stats.bit_threshold(20, 2.0**-20 * 0.999) == 21


# ---------------------------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 16, 64, 500])
def test_clopper_pearson_matches_scipy_binomtest(n):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        if k < 0:
            continue
        ci = st.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        low, high = stats.clopper_pearson(k, n)
        assert low == pytest.approx(ci.low, abs=1e-10)
        assert high == pytest.approx(ci.high, abs=1e-10)
        ci90 = st.binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact")
        assert stats.clopper_pearson(k, n, alpha=0.10) == pytest.approx((ci90.low, ci90.high), abs=1e-10)


def test_clopper_pearson_edges():
    assert stats.clopper_pearson(0, 10)[0] == 0.0
    assert stats.clopper_pearson(10, 10)[1] == 1.0
    assert stats.clopper_pearson(0, 0) == (0.0, 1.0)
    # k = 0: the upper bound has the closed form 1 - (alpha/2)^(1/n)
    assert stats.clopper_pearson(0, 20)[1] == pytest.approx(1 - 0.025 ** (1 / 20))
    with pytest.raises(ValueError):
        stats.clopper_pearson(5, 3)


def test_rate():
    e = stats.rate(3, 12)
    assert (e.value, e.n) == (0.25, 12)
    assert (e.low, e.high) == stats.clopper_pearson(3, 12)
    e0 = stats.rate(0, 0)
    assert math.isnan(e0.value) and (e0.low, e0.high, e0.n) == (0.0, 1.0, 0)
    with pytest.raises(Exception):
        e.value = 1.0  # frozen


def test_bit_accuracy_value_interval_and_determinism():
    rng = np.random.default_rng(123)
    matches = rng.binomial(48, 0.8, size=400)
    a = stats.bit_accuracy(matches, 48)
    assert a.value == pytest.approx(matches.mean() / 48)
    assert a.n == 400
    assert a.low < a.value < a.high
    # deterministic for a seed; same distribution, different draws for another seed
    assert stats.bit_accuracy(matches, 48) == a
    b = stats.bit_accuracy(matches, 48, generator_seed=1)
    assert b != a and b.value == a.value
    # large-sample width agrees with the normal approximation of the mean over images
    se = (matches / 48).std(ddof=1) / math.sqrt(400)
    assert (a.high - a.low) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bit_accuracy_resamples_images_not_bits():
    # Half the images decode perfectly, half at chance level exactly: the spread is between images, and the
    # interval must reflect it; a binomial interval over 48 * 40 bits would be about 6x narrower.
    matches = np.array([48] * 20 + [24] * 20)
    a = stats.bit_accuracy(matches, 48)
    assert a.value == pytest.approx(0.75)
    per_image_se = (matches / 48).std(ddof=1) / math.sqrt(40)
    binom_low, binom_high = stats.clopper_pearson(int(matches.sum()), 48 * 40)
    assert (a.high - a.low) > 3 * (binom_high - binom_low)
    assert (a.high - a.low) == pytest.approx(2 * 1.96 * per_image_se, rel=0.25)


def test_bit_accuracy_edges():
    one = stats.bit_accuracy([48] * 10, 48)
    assert (one.value, one.low, one.high) == (1.0, 1.0, 1.0)
    empty = stats.bit_accuracy([], 48)
    assert empty.n == 0 and math.isnan(empty.value)


def test_bootstrap_median():
    x = np.arange(101, dtype=float)
    e = stats.bootstrap(x, "median")
    assert e.value == 50.0 and e.low < 50 < e.high
    assert stats.bootstrap(x, "median") == e


def test_mean_t_interval_matches_scipy():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=25)
    e = stats.mean_t_interval(x)
    lo, hi = st.t.interval(0.95, 24, loc=x.mean(), scale=st.sem(x))
    assert (e.value, e.n) == (pytest.approx(x.mean()), 25)
    assert (e.low, e.high) == (pytest.approx(lo), pytest.approx(hi))
    assert math.isnan(stats.mean_t_interval([1.0]).low)


# ---------------------------------------------------------------------------------------------------------------
# Operating points
# ---------------------------------------------------------------------------------------------------------------
def test_tpr_at_fpr_bits():
    pos = [48, 41, 41, 40, 30]  # 41 is detected at 1e-6 (matches >= 41), 40 is not
    neg = [24, 26, 41, 20]
    op = stats.tpr_at_fpr_bits(pos, neg, 48, 1e-6)
    assert op.threshold == 41
    assert op.analytic_fpr == pytest.approx(st.binom.sf(40, 48, 0.5))
    assert (op.tpr.value, op.tpr.n) == (3 / 5, 5)
    assert (op.tpr.low, op.tpr.high) == stats.clopper_pearson(3, 5)
    assert (op.fpr.value, op.fpr.n) == (1 / 4, 4)
    # too few bits for the FPR: nothing detected
    op = stats.tpr_at_fpr_bits([10, 10], [0], 10, 1e-6)
    assert op.threshold == 11 and op.tpr.value == 0.0 and op.analytic_fpr == 0.0


def _brute_auc(pos, neg):
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else 0.5 if p == q else 0.0
    return total / (len(pos) * len(neg))


def test_roc_auc_against_brute_force_pair_count():
    rng = np.random.default_rng(7)
    for trial in range(20):
        n_pos, n_neg = rng.integers(1, 40, size=2)
        pos = rng.integers(0, 10, size=n_pos) + rng.integers(0, 3)  # integer scores: many ties
        neg = rng.integers(0, 10, size=n_neg)
        e = stats.roc_auc(pos, neg, n_boot=200)
        assert e.value == pytest.approx(_brute_auc(pos, neg), abs=1e-12)
        assert e.n == n_pos + n_neg
        assert e.low <= e.value + 1e-12 and e.high >= e.value - 1e-12
        assert 0.0 <= e.low <= e.high <= 1.0
    pos, neg = rng.normal(1, 1, 50), rng.normal(0, 1, 60)
    assert stats.roc_auc(pos, neg).value == pytest.approx(_brute_auc(pos, neg))
    # also equals scipy's Mann-Whitney U / (n_pos n_neg)
    u = st.mannwhitneyu(pos, neg).statistic
    assert stats.roc_auc(pos, neg).value == pytest.approx(u / (50 * 60))


def test_roc_auc_edges_and_determinism():
    assert stats.roc_auc([2, 3], [0, 1]).value == 1.0
    assert stats.roc_auc([0, 1], [2, 3]).value == 0.0
    assert stats.roc_auc([1, 1], [1, 1, 1]).value == 0.5
    assert math.isnan(stats.roc_auc([], [1.0]).value)
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0.5, 1, 80), rng.normal(0, 1, 90)
    assert stats.roc_auc(pos, neg) == stats.roc_auc(pos, neg)
    e = stats.roc_auc(pos, neg)
    # bootstrap width comparable to the Hanley-McNeil standard error
    a = e.value
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + 79 * (q1 - a * a) + 89 * (q2 - a * a)) / (80 * 90))
    assert (e.high - e.low) == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_empirical_threshold_hand_examples():
    neg = list(range(1, 11))  # 1..10
    assert stats.empirical_threshold(neg, 0.1) == (9.0, True)  # one negative (10) above 9
    assert stats.empirical_threshold(neg, 0.25) == (8.0, True)  # floor(2.5) = 2 allowed: 9, 10
    assert stats.empirical_threshold(neg, 0.05) == (10.0, False)  # 10 < 1/0.05 negatives
    assert stats.empirical_threshold(neg, 1.0) == (-math.inf, True)
    # ties: the largest fraction <= fpr that a threshold can give
    assert stats.empirical_threshold([1, 2, 3, 3, 3, 3, 3, 3, 3, 3], 0.2) == (3.0, True)
    assert stats.empirical_threshold([1, 2, 2, 3, 3, 3, 3, 3, 3, 3], 0.8) == (2.0, True)  # 7/10 above 2
    # fpr * n that is an integer in decimal but not in binary
    assert stats.empirical_threshold(np.arange(100), 0.29) == (70.0, True)  # 29 above 70
    assert stats.empirical_threshold(np.arange(1000), 1e-3) == (998.0, True)
    assert stats.empirical_threshold([], 0.1) == (math.inf, False)


def test_empirical_threshold_brute_force():
    rng = np.random.default_rng(11)
    for trial in range(200):
        neg = rng.integers(0, 8, size=rng.integers(1, 30)).astype(float)
        fpr = float(rng.choice([0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9]))
        thr, resolvable = stats.empirical_threshold(neg, fpr)
        n = neg.size
        assert resolvable == (n >= 1 / fpr - 1e-9)
        ok = [t for t in np.unique(neg) if (neg > t).mean() <= fpr]
        if not ok:  # only possible when fpr * n >= n
            assert thr == -math.inf
            continue
        assert thr == min(ok)
        best = max((neg > t).mean() for t in ok)
        assert (neg > thr).mean() == best


def test_tpr_at_fpr_scores():
    neg = np.arange(16, dtype=float)
    pos = np.array([20.0, 15.0, 14.0, 30.0])
    op = stats.tpr_at_fpr_scores(pos, neg, 1e-6)
    assert not op.resolvable and op.threshold == 15.0
    assert op.note == ("N_neg=16 cannot resolve FPR 1e-06 (needs >= 1000000 negatives); "
                       "threshold = max negative score")
    assert (op.tpr.value, op.tpr.n) == (0.5, 4)  # 20 and 30 > 15; 15 is not (strict)
    assert (op.fpr.value, op.fpr.n) == (0.0, 16)
    op = stats.tpr_at_fpr_scores(pos, neg, 0.125)  # 2 of 16 allowed: threshold 13
    assert op.resolvable and op.note == "" and op.threshold == 13.0
    assert op.tpr.value == 1.0 and op.fpr.value == 2 / 16
    assert (op.fpr.low, op.fpr.high) == stats.clopper_pearson(2, 16)


@pytest.mark.parametrize("n, fpr, label", [(32, 1e-6, "fpr<=1/32"), (32, 1 / 32, "fpr<=1/32"),
                                           (32, 0.1, "fpr<=3/32"), (100, 0.29, "fpr<=29/100"), (16, 2.0, "fpr<=16/16"),
                                           (1, 1e-2, "fpr<=1/1")])
def test_empirical_fpr_label_names_the_fpr_the_negatives_resolve(n, fpr, label):
    assert stats.empirical_fpr_label(n, fpr) == label
    # the label's count is what the threshold lets through: at most k negatives strictly above it
    neg = np.arange(n, dtype=float)
    thr, _ = stats.empirical_threshold(neg, fpr)
    k = int(label.split("<=")[1].split("/")[0])
    assert (neg > thr).sum() <= k


def test_analytic_fpr_label_is_the_bare_target():
    assert stats.analytic_fpr_label(1e-6) == "1e-06" and stats.analytic_fpr_label(0.01) == "0.01"
    with pytest.raises(ValueError, match="at least one negative"):
        stats.empirical_fpr_label(0, 0.1)


def _exact_hierarchical_distribution(groups):
    """Every outcome of the two-level bootstrap, with its probability (brute force over all draws)."""
    import itertools
    from collections import defaultdict

    g = len(groups)
    dist = defaultdict(float)
    for picks in itertools.product(range(g), repeat=g):
        inner = [list(itertools.product(groups[i], repeat=len(groups[i]))) for i in picks]
        p_inner = np.prod([1.0 / len(x) for x in inner])
        for combo in itertools.product(*inner):
            stat = np.mean([np.mean(c) for c in combo])
            dist[round(float(stat), 12)] += (1.0 / g ** g) * p_inner
    return dist


def test_hierarchical_bootstrap_matches_brute_force_enumeration():
    """Two seeds of three images each: the replicates' distribution equals the exact one over all 2^2 * 27^2 draws."""
    groups = [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    exact = _exact_hierarchical_distribution(groups)
    assert sum(exact.values()) == pytest.approx(1.0)
    support = np.array(sorted(exact))
    probs = np.array([exact[v] for v in support])
    reps = stats.hierarchical_replicates(groups, np.random.default_rng(0), 40_000)
    freq = np.array([np.mean(np.isclose(reps, v)) for v in support])
    assert freq.sum() == pytest.approx(1.0)  # every replicate is a possible outcome
    np.testing.assert_allclose(freq, probs, atol=0.01)
    mean, var = (probs * support).sum(), (probs * (support - (probs * support).sum()) ** 2).sum()
    assert reps.mean() == pytest.approx(mean, abs=0.005) and reps.var() == pytest.approx(var, rel=0.03)
    est = stats.hierarchical_bootstrap(groups, n_boot=4000)
    cdf = np.cumsum(probs)
    assert est.value == pytest.approx(0.5) and est.n == 6
    assert est.low == support[np.searchsorted(cdf, 0.025 - 1e-9)]  # the exact 2.5% quantile of the outcomes
    assert est.high == support[np.searchsorted(cdf, 0.975 - 1e-9)]


def test_hierarchical_interval_includes_the_spread_between_embeddings():
    """Two embeddings that disagree (0.95 vs 0.55, 64 images each): pooling images gives a narrow interval around
    0.75; resampling embeddings first widens it to span both."""
    rng = np.random.default_rng(1)
    a, b = (rng.random(64) < 0.95).astype(float), (rng.random(64) < 0.55).astype(float)
    h = stats.hierarchical_bootstrap([a, b])
    pooled = stats.bootstrap(np.concatenate([a, b]))
    assert h.value == pytest.approx((a.mean() + b.mean()) / 2)
    assert h.high - h.low > 2 * (pooled.high - pooled.low)
    assert h.low <= b.mean() + 0.05 and h.high >= a.mean() - 0.05
    one = stats.hierarchical_bootstrap([a])  # one group: the ordinary bootstrap of its mean
    assert (one.low, one.high) == pytest.approx((stats.bootstrap(a).low, stats.bootstrap(a).high), abs=0.03)


def _exact_tree_distribution(tree):
    """Every outcome of the multi-level bootstrap of a tree (a leaf: a list of values; a group: a list of trees),
    with its probability, by brute force: a leaf's resampled means over all n^n draws; a group draws G of its G
    members (G^G picks), each drawn slot an independent outcome of that member."""
    import itertools
    from collections import defaultdict

    if all(isinstance(x, float) for x in tree):
        dist = defaultdict(float)
        for draw in itertools.product(tree, repeat=len(tree)):
            dist[round(float(np.mean(draw)), 9)] += 1.0 / len(tree) ** len(tree)
        return dist
    members = [_exact_tree_distribution(m) for m in tree]
    g = len(tree)
    dist = defaultdict(float)
    for picks in itertools.product(range(g), repeat=g):
        for combo in itertools.product(*(members[i].items() for i in picks)):
            p = np.prod([q for _, q in combo]) / g ** g
            dist[round(float(np.mean([v for v, _ in combo])), 9)] += p
    return dist


def test_three_level_bootstrap_matches_brute_force_enumeration():
    """Two run seeds, the first with two attack runs: run seeds are drawn, then attack runs within each drawn seed,
    then images; the replicates' distribution equals the exact one, and the value is the mean over seeds of the
    mean over their attack runs (not the mean of the three runs)."""
    tree = [[[0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0, 1.0]]]
    exact = _exact_tree_distribution(tree)
    assert sum(exact.values()) == pytest.approx(1.0)
    support = np.array(sorted(exact))
    probs = np.array([exact[v] for v in support])
    reps = stats.hierarchical_replicates(tree, np.random.default_rng(0), 40_000)
    freq = np.array([np.mean(np.isclose(reps, v)) for v in support])
    assert freq.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(freq, probs, atol=0.01)
    mean = (probs * support).sum()
    assert reps.mean() == pytest.approx(mean, abs=0.005)
    est = stats.hierarchical_bootstrap(tree, n_boot=4000)
    assert est.value == pytest.approx(((0.5 + 1.0) / 2 + 1 / 3) / 2) and est.n == 7


def test_two_level_input_draws_what_it_always_drew_and_one_seed_of_runs_is_its_runs():
    rng = np.random.default_rng(5)
    a, b, c = rng.random(16), rng.random(9), rng.random(30)
    # a single run seed holding two attack runs: drawing one seed of one is no draw, so it is the runs' bootstrap
    assert stats.hierarchical_bootstrap([[a, b]]) == stats.hierarchical_bootstrap([a, b])
    # nested groups of one member are their member
    assert stats.hierarchical_bootstrap([[a], [b], [c]]) == stats.hierarchical_bootstrap([a, b, c])
    with pytest.raises(ValueError, match="at least one"):
        stats.hierarchical_bootstrap([[a, []]])


def test_attack_runs_nested_in_their_seed_count_as_one_embedding():
    """Two embeddings that disagree (0.95 vs 0.55), each attacked twice with nearly the same outcome: the interval
    rests on two embeddings, as wide as two seeds of one run each, and wider than treating the four runs as four
    independent repetitions (which halves the chance of drawing one embedding only)."""
    rng = np.random.default_rng(2)
    runs = [[rng.normal(m, 0.02, 32) for _ in range(2)] for m in (0.95, 0.55)]
    nested = stats.hierarchical_bootstrap(runs)
    flat = stats.hierarchical_bootstrap([r for seed in runs for r in seed])
    per_seed = stats.hierarchical_bootstrap([np.concatenate(seed) for seed in runs])
    assert nested.value == pytest.approx(flat.value)
    # the replicates' spread: two draws of two embeddings (sd 0.2 / sqrt 2), not four draws (0.2 / 2)
    sd = lambda groups: stats.hierarchical_replicates(groups, np.random.default_rng(0), 4000).std()  # noqa: E731
    assert sd(runs) == pytest.approx(0.2 / np.sqrt(2), rel=0.1)
    assert sd([r for seed in runs for r in seed]) == pytest.approx(0.2 / 2, rel=0.1)
    # the 95% interval spans both embeddings, as two seeds of one run each do
    assert nested.low < 0.56 and nested.high > 0.94
    assert nested.high - nested.low == pytest.approx(per_seed.high - per_seed.low, rel=0.1)


def test_hierarchical_bootstrap_reads_a_2d_array_as_a_group_of_its_rows_like_nested_lists():
    """Two run seeds, each with two attack runs given as a 2 x 32 array: the same interval as the same values given
    as nested lists (a 2-D array used to be pooled into one group of 64 values, a far narrower interval)."""
    rng = np.random.default_rng(7)
    runs = [rng.normal(np.array(m)[:, None], 0.02, (2, 32)) for m in ((0.45, 0.75), (0.5, 0.7))]
    as_lists = stats.hierarchical_bootstrap([[list(r) for r in g] for g in runs], seed=0)
    as_arrays = stats.hierarchical_bootstrap(runs, seed=0)
    assert (as_arrays.value, as_arrays.low, as_arrays.high) == pytest.approx((as_lists.value, as_lists.low, as_lists.high))
    pooled = stats.hierarchical_bootstrap([g.ravel() for g in runs], seed=0)
    assert as_arrays.high - as_arrays.low > 2 * (pooled.high - pooled.low)


# ---------------------------------------------------------------------------------------------------------------
# ROC AUC over several repetitions: placements and the two-sample hierarchical bootstrap
# ---------------------------------------------------------------------------------------------------------------
def _brute_placements(pos, neg):
    v10 = [sum(1.0 if p > q else 0.5 if p == q else 0.0 for q in neg) / len(neg) for p in pos]
    v01 = [sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos) / len(pos) for q in neg]
    return v10, v01


def test_auc_placements_match_a_pairwise_count_with_ties_and_both_means_are_the_auc():
    rng = np.random.default_rng(5)
    pos = rng.integers(20, 48, size=23).astype(float)  # matching bits: many ties
    neg = rng.integers(14, 34, size=31).astype(float)
    pl = stats.auc_placements(pos, neg)
    v10, v01 = _brute_placements(pos, neg)
    np.testing.assert_allclose(pl.pos, v10, atol=1e-12)
    np.testing.assert_allclose(pl.neg, v01, atol=1e-12)
    auc = stats.roc_auc(pos, neg).value
    assert pl.pos.mean() == pytest.approx(auc, abs=1e-12) and pl.neg.mean() == pytest.approx(auc, abs=1e-12)


def test_hierarchical_auc_of_one_repetition_has_delongs_spread_and_roc_aucs_value():
    """One repetition: the value is roc_auc's; the bootstrap's standard deviation is DeLong's standard error
    (var(V10)/m + var(V01)/n, computed here from the pairwise placements), and its interval is close to roc_auc's
    stratified bootstrap."""
    rng = np.random.default_rng(11)
    pos, neg = rng.normal(0.8, 1.0, 64), rng.normal(0.0, 1.0, 48)
    pl = stats.auc_placements(pos, neg)
    v10, v01 = map(np.asarray, _brute_placements(pos, neg))
    delong_se = math.sqrt(v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size)
    reps = stats._tree_replicates([pl], np.random.default_rng(0), 20000)
    assert reps.std() == pytest.approx(delong_se, rel=0.05)
    est, ref = stats.hierarchical_auc([pl]), stats.roc_auc(pos, neg)
    assert est.value == pytest.approx(ref.value, abs=1e-12) and est.n == 112
    assert abs(est.low - ref.low) < 0.02 and abs(est.high - ref.high) < 0.02


def test_hierarchical_auc_puts_the_spread_between_repetitions_into_the_interval():
    rng = np.random.default_rng(3)
    neg = rng.normal(0.0, 1.0, 32)
    strong = stats.auc_placements(rng.normal(2.5, 1.0, 32), neg)
    weak = stats.auc_placements(rng.normal(0.3, 1.0, 32), neg)
    both = stats.hierarchical_auc([strong, weak])
    assert both.value == pytest.approx((strong.mean() + weak.mean()) / 2)
    one = stats.hierarchical_auc([strong])
    assert both.high - both.low > 2 * (one.high - one.low)  # disagreeing repetitions widen it
    nested = stats.hierarchical_auc([[strong, weak]])  # attack runs nested in one run seed: the same draws
    assert nested.value == pytest.approx(both.value)
    assert not stats.is_binary([strong, weak])
