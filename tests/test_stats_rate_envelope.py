"""A rate over several attack runs or embeddings (bench.stats.hierarchical_rate): never narrower than the exact
Clopper-Pearson interval of the pooled count (checked against scipy's binomtest), the bootstrap's where that is
wider; the leaderboard uses it for 0/1 outcomes only, and leaves one repetition's interval as it was stored."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from markbench import stats
from markbench.reports.leaderboard import _summary
from markbench.reports.data import Value


def _scipy_cp(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return ci.low, ci.high


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_a_constant_rate_over_two_runs_gets_the_pooled_exact_interval_not_a_point(fill):
    groups = [np.full(32, fill), np.full(32, fill)]
    boot = stats.hierarchical_bootstrap(groups)
    assert boot.low == boot.high == fill  # the degenerate interval this replaces
    est = stats.hierarchical_rate(groups)
    low, high = _scipy_cp(int(fill) * 64, 64)
    assert est.value == fill and est.n == 64
    assert est.low == pytest.approx(low, abs=1e-12) and est.high == pytest.approx(high, abs=1e-12)
    assert est.high - est.low > 0.05


def test_disagreeing_runs_keep_the_wider_bootstrap_interval():
    groups = [np.r_[np.ones(30), np.zeros(2)], np.r_[np.ones(2), np.zeros(30)]]  # 0.94 and 0.06
    boot = stats.hierarchical_bootstrap(groups)
    low, high = _scipy_cp(32, 64)
    assert boot.low < low and boot.high > high  # the spread between runs is wider than the pooled count's
    est = stats.hierarchical_rate(groups)
    assert (est.low, est.high) == (boot.low, boot.high)


def test_nested_attack_runs_pool_every_outcome():
    rng = np.random.default_rng(3)
    groups = [[(rng.random(16) < 0.1).astype(float) for _ in range(2)] for _ in range(2)]
    k = int(sum(g.sum() for seed in groups for g in seed))
    low, high = _scipy_cp(k, 64)
    est = stats.hierarchical_rate(groups)
    assert est.low <= low + 1e-12 and est.high >= high - 1e-12


def test_a_non_binary_value_is_refused():
    with pytest.raises(ValueError, match="0 or 1"):
        stats.hierarchical_rate([np.array([0.5, 1.0]), np.array([1.0, 1.0])])


def _value(samples, seed):
    x = np.asarray(samples, dtype=float)
    low, high = stats.clopper_pearson(int(x.sum()), x.size)
    return Value(value=float(x.mean()), low=low, high=high, n=x.size, samples=tuple(x.tolist()))


def test_the_leaderboard_summary_uses_the_envelope_for_rates_over_attack_runs_only():
    one = _summary([_value(np.zeros(32), 0)], attacked=True, seeds=[0])
    assert (one["low"], one["high"]) == pytest.approx(_scipy_cp(0, 32))  # one run: its own interval, unchanged
    two = _summary([_value(np.zeros(32), 0), _value(np.zeros(32), 0)], attacked=True, seeds=[0, 0])
    assert (two["low"], two["high"]) == pytest.approx(_scipy_cp(0, 64))
    assert two["n_attack_runs"] == 2
    # a mean of non-binary values (PSNR, bit accuracy) keeps the plain hierarchical bootstrap
    psnr = [Value(value=30.0, low=29.0, high=31.0, n=3, samples=(30.0, 30.0, 30.0))] * 2
    out = _summary(psnr, attacked=True, seeds=[0, 0])
    assert out["interval"] == "hierarchical bootstrap" and out["low"] == out["high"] == 30.0
