"""Statistics for watermark detection and image quality: exact binomial tests, intervals, operating points.

Pure numpy/scipy (no torch): inputs may be lists, numpy arrays or CPU tensors (anything ``np.asarray`` accepts).
Every function returns plain Python floats/ints or a small frozen dataclass.

Conventions
-----------
* **Multi-bit detection.** For a message of ``n_bits`` bits, ``matches`` is the number of bits the verifier read
  correctly. Under the null hypothesis (an unmarked image) the matches are ``X ~ Binomial(n_bits, 0.5)``. An image
  is **detected iff matches >= tau** (:func:`bit_threshold`), and its p-value is ``P(X >= matches)``
  (:func:`binomial_pvalue`, one-sided). Example: 48 bits at FPR 1e-6 gives tau = 41
  (``P(X >= 41) = 3.1e-7 <= 1e-6 < P(X >= 40) = 1.65e-6``). Some baselines write "matches > tau"; ours is ">=".
* **Zero-bit (score) detection.** Higher score = more likely marked; an image is **detected iff score >
  threshold** (strict), the threshold being a negative score chosen by :func:`empirical_threshold`.
* **Intervals** are two-sided 95% (``alpha = 0.05``) unless stated. Rates (TPR, FPR) use the exact
  Clopper-Pearson interval. Means/medians over images use a percentile bootstrap over *images* with a
  ``numpy.random.Generator`` seeded by ``seed`` (deterministic: the same data give the same interval). Percentile
  bootstrap intervals collapse to a point when every image has the same value (e.g. bit accuracy 1.0 on all
  images): that says the sample has no spread, not that the population has none.
* An undefined value (no samples) is ``nan`` in an :class:`Estimate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import numpy as np
from scipy import special as _sp
from scipy import stats as _st

__all__ = [
    "Estimate", "BitsOperatingPoint", "ScoreOperatingPoint", "clopper_pearson", "binomial_pvalue",
    "log10_binomial_pvalue", "bit_threshold", "bootstrap", "bit_accuracy", "mean_t_interval", "rate",
    "tpr_at_fpr_bits", "roc_auc", "empirical_threshold", "tpr_at_fpr_scores", "empirical_fpr_label",
    "analytic_fpr_label", "hierarchical_bootstrap", "hierarchical_rate", "hierarchical_replicates", "is_binary",
    "Placements", "auc_placements", "hierarchical_auc",
]

_EPS = 1e-9  # relative tolerance when turning fpr * n into a count (0.29 * 100 must give 29, not 28)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided interval ``[low, high]`` and the sample size ``n`` it rests on."""

    value: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class BitsOperatingPoint:
    """TPR/FPR of a multi-bit verifier at the analytic threshold for ``target_fpr``.

    ``threshold`` tau: detected iff matches >= tau. ``analytic_fpr`` = P(X >= tau), X ~ Binomial(n_bits, 0.5) (the
    FPR the threshold guarantees under the null); ``fpr`` is the rate measured on the given negatives.
    """

    target_fpr: float
    n_bits: int
    threshold: int
    analytic_fpr: float
    tpr: Estimate
    fpr: Estimate


@dataclass(frozen=True)
class ScoreOperatingPoint:
    """TPR/FPR of a zero-bit verifier at a threshold set on the negatives' scores (detected iff score >
    threshold). ``resolvable`` is False when there are too few negatives to resolve ``target_fpr``; ``note`` then
    says so."""

    target_fpr: float
    threshold: float
    resolvable: bool
    tpr: Estimate
    fpr: Estimate
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Binomial
# ---------------------------------------------------------------------------------------------------------------
def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided ``1 - alpha`` interval for a binomial proportion ``k / n``.

    ``low = Beta.ppf(alpha/2; k, n-k+1)`` (0 when k = 0), ``high = Beta.ppf(1-alpha/2; k+1, n-k)`` (1 when k = n);
    ``n = 0`` gives ``(0, 1)``.
    """
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    low = 0.0 if k == 0 else float(_st.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(_st.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def binomial_pvalue(matches: Any, n_bits: int) -> Any:
    """One-sided p-value ``P(X >= matches)``, ``X ~ Binomial(n_bits, 0.5)``.

    A float for a scalar ``matches``, a float array for an array. For very long messages use
    :func:`log10_binomial_pvalue`, which does not underflow.
    """
    m = np.asarray(matches)
    p = _st.binom.sf(m - 1, int(n_bits), 0.5)
    return float(p) if np.ndim(p) == 0 else np.asarray(p, dtype=float)


def log10_binomial_pvalue(matches: Any, n_bits: int) -> Any:
    """``log10 P(X >= matches)``, ``X ~ Binomial(n_bits, 0.5)``, computed in log space (float or float array).

    Does not underflow (``P(X >= 2000)`` of 2000 bits is ``2**-2000``, log10 = -602.06). ``matches > n_bits`` gives
    ``-inf``, ``matches <= 0`` gives 0.
    """
    n = int(n_bits)
    m = np.asarray(matches)
    j = np.arange(n + 1, dtype=float)
    log_pmf = _sp.gammaln(n + 1.0) - _sp.gammaln(j + 1.0) - _sp.gammaln(n - j + 1.0) - n * math.log(2.0)
    log_tail = np.append(np.logaddexp.accumulate(log_pmf[::-1])[::-1], -np.inf)  # [k] = log P(X >= k), k=0..n+1
    log_tail[0] = 0.0
    lp = log_tail[np.clip(m.astype(np.int64), 0, n + 1)] / math.log(10.0)
    return float(lp) if np.ndim(lp) == 0 else np.asarray(lp, dtype=float)


def bit_threshold(n_bits: int, fpr: float) -> int:
    """The smallest tau with ``P(X >= tau) <= fpr``, ``X ~ Binomial(n_bits, 0.5)``; detected iff matches >= tau.

    Computed exactly (integer binomial coefficients against ``fpr`` as an exact fraction), so there is no rounding
    at the boundary. 48 bits at 1e-6 gives 41. If even ``P(X >= n_bits) = 2**-n_bits`` exceeds ``fpr`` (too few bits
    for that FPR) the result is ``n_bits + 1``: no image can be detected.
    """
    n = int(n_bits)
    if n < 0:
        raise ValueError(f"n_bits must be >= 0, got {n_bits}")
    if not fpr >= 0:
        raise ValueError(f"fpr must be >= 0, got {fpr}")
    budget = Fraction(fpr) * (1 << n)  # allowed number of the 2**n equally likely bit strings
    tail = 0  # number of strings with >= tau matches, for tau going down from n+1
    for tau in range(n, -1, -1):
        tail += math.comb(n, tau)
        if tail > budget:
            return tau + 1
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Intervals for means and medians
# ---------------------------------------------------------------------------------------------------------------
def bootstrap(values: Any, statistic: str | Callable[[np.ndarray], np.ndarray] = "mean", *, seed: int = 0,
              n_boot: int = 2000, alpha: float = 0.05) -> Estimate:
    """``statistic`` of ``values`` with a ``1 - alpha`` percentile bootstrap interval (resampling the values).

    ``statistic`` is ``"mean"``, ``"median"`` or a function mapping a ``[B, n]`` array to ``[B]`` (applied row-wise).
    Resamples come from ``np.random.default_rng(seed)`` in fixed-size chunks, so the result is deterministic.
    Empty input gives ``nan`` everywhere; one value gives the degenerate interval ``[v, v]``.
    """
    x = np.asarray(values, dtype=float).ravel()
    n = x.size
    fn: Callable[[np.ndarray], np.ndarray]
    if statistic == "mean":
        fn = lambda a: a.mean(axis=-1)  # noqa: E731
    elif statistic == "median":
        fn = lambda a: np.median(a, axis=-1)  # noqa: E731
    elif callable(statistic):
        fn = statistic
    else:
        raise ValueError(f"unknown statistic {statistic!r}")
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    value = float(fn(x[None, :])[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 2_000_000 // n))
    reps = []
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        reps.append(np.asarray(fn(x[rng.integers(0, n, size=(b, n))]), dtype=float))
        done += b
    lo, hi = np.percentile(np.concatenate(reps), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Estimate(value, float(lo), float(hi), n)


@dataclass(frozen=True)
class Placements:
    """One ROC AUC's structural components (DeLong, DeLong & Clarke-Pearson 1988): ``pos``, each positive's placement
    among the negatives (the share of negatives below it, ties counting half), and ``neg``, each negative's among the
    positives (the share of positives above it, ties half). Both means are the AUC. A leaf of a hierarchical
    bootstrap (:func:`hierarchical_auc`): one repetition's AUC with both of its samples."""

    pos: np.ndarray
    neg: np.ndarray

    @property
    def size(self) -> int:
        return int(self.pos.size + self.neg.size)

    def mean(self) -> float:
        return float(self.pos.mean())

    def replicates(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """``k`` bootstrap replicates of the AUC, positives and negatives resampled apart (stratified), through its
        linearisation: ``mean(pos*) + mean(neg*) - AUC``, whose variance is DeLong's ``var(pos)/m + var(neg)/n``."""
        auc = self.mean()
        p = self.pos[rng.integers(0, self.pos.size, size=(k, self.pos.size))].mean(axis=1)
        q = self.neg[rng.integers(0, self.neg.size, size=(k, self.neg.size))].mean(axis=1)
        return p + q - auc


def auc_placements(pos_scores: Any, neg_scores: Any) -> Placements:
    """The :class:`Placements` of positives' and negatives' scores (higher = more likely marked)."""
    pos = np.asarray(pos_scores, dtype=float).ravel()
    neg = np.asarray(neg_scores, dtype=float).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUC placements need positives and negatives")
    sn, sp = np.sort(neg), np.sort(pos)
    v10 = (np.searchsorted(sn, pos, side="left") + np.searchsorted(sn, pos, side="right")) / (2.0 * neg.size)
    v01 = 1.0 - (np.searchsorted(sp, neg, side="left") + np.searchsorted(sp, neg, side="right")) / (2.0 * pos.size)
    return Placements(v10, v01)


def hierarchical_auc(groups: Any, *, seed: int = 0, n_boot: int = 2000, alpha: float = 0.05) -> Estimate:
    """The mean AUC over repetitions with a ``1 - alpha`` percentile interval from a multi-level bootstrap:
    repetitions (run seeds, then the attack runs within each, nested as for :func:`hierarchical_bootstrap`) are
    resampled, and within each drawn repetition its positives and negatives apart (:meth:`Placements.replicates`),
    so the interval holds the spread between embeddings and attack runs and both samples' variance. ``groups``: a
    list whose leaves are :class:`Placements`. ``n`` = positives plus negatives over all repetitions."""
    groups = list(groups)
    if not groups:
        return Estimate(math.nan, math.nan, math.nan, 0)
    tree = _as_tree(groups)
    if not isinstance(tree, list):
        tree = [tree]
    reps = _tree_replicates(tree, np.random.default_rng(seed), n_boot)
    lo, hi = np.percentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Estimate(_tree_mean(tree), float(lo), float(hi), _tree_size(tree))


def _is_leaf(node: Any) -> bool:
    """A group of values (a 1-D array, or a sequence of numbers), as opposed to a group of groups (a 2-D array is
    a group of its rows, as the same values given as nested lists are). :class:`Placements` are a leaf."""
    if isinstance(node, Placements):
        return True
    if isinstance(node, np.ndarray):
        return node.dtype != object and node.ndim <= 1
    if hasattr(node, "numpy") and hasattr(node, "shape"):  # a tensor
        return len(node.shape) <= 1
    return all(np.isscalar(x) or (isinstance(x, np.ndarray) and x.ndim == 0) for x in node)


def _as_tree(node: Any) -> Any:
    """``node`` with every leaf a float array and every group of groups a list (checked: no empty group)."""
    if isinstance(node, Placements):
        return node
    if _is_leaf(node):
        a = np.asarray(node, dtype=float).ravel()
        if a.size == 0:
            raise ValueError("hierarchical bootstrap: every group needs at least one value")
        return a
    children = [_as_tree(c) for c in node]
    if not children:
        raise ValueError("hierarchical bootstrap: every group needs at least one member")
    # a group whose one member is a group of groups is that member: drawing one of one changes nothing
    return children[0] if len(children) == 1 and isinstance(children[0], list) else children


def _tree_mean(tree: Any) -> float:
    if isinstance(tree, (np.ndarray, Placements)):
        return float(tree.mean())
    return float(np.mean([_tree_mean(c) for c in tree]))


def _tree_size(tree: Any) -> int:
    return int(tree.size) if isinstance(tree, (np.ndarray, Placements)) else sum(_tree_size(c) for c in tree)


def _tree_replicates(tree: Any, rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` bootstrap replicates of the tree's mean of means: a leaf resamples its values; a group draws as many
    members as it has, with replacement, and each drawn slot is one independent replicate of that member."""
    if isinstance(tree, np.ndarray):
        return tree[rng.integers(0, tree.size, size=(k, tree.size))].mean(axis=1)
    if isinstance(tree, Placements):
        return tree.replicates(rng, k)
    n = len(tree)
    picks = rng.integers(0, n, size=(k, n))
    means = np.empty((k, n))
    for g, child in enumerate(tree):  # every slot that drew member g gets its own replicate of g
        slots = picks == g
        c = int(slots.sum())
        if c:
            means[slots] = _tree_replicates(child, rng, c)
    return means.mean(axis=1)


def hierarchical_replicates(groups: Any, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """``n_boot`` multi-level bootstrap replicates of the mean of group means: draw G groups with replacement from
    the G groups, then, within each drawn group, its members with replacement (as many as it has), down to the
    values; a replicate is the mean over the drawn groups of their resampled means.

    ``groups``: a list of groups, each a sequence of values (two levels: repetitions, then images) or itself a list
    of groups (three levels: e.g. run seeds, the attack runs within each, then images). Two-level input draws the
    same random numbers as it always did (its replicates are unchanged)."""
    tree = _as_tree(list(groups))
    if isinstance(tree, np.ndarray) or not groups:
        raise ValueError("hierarchical bootstrap: give a list of groups")
    return _tree_replicates(tree, rng, n_boot)


def hierarchical_bootstrap(groups: Any, *, seed: int = 0, n_boot: int = 2000, alpha: float = 0.05) -> Estimate:
    """The mean of group means with a ``1 - alpha`` percentile interval from a multi-level bootstrap.

    ``groups``: one array of per-image values per independent repetition (a run seed: a new key, embedding and
    attack run). Resampling the repetitions first, then the images within each, puts the spread *between*
    embeddings and attack runs into the interval, which a bootstrap over pooled images leaves out (Davison &
    Hinkley 1997, Sec. 3.8; Field & Welsh 2007). Each repetition counts equally. With one group this is the
    ordinary bootstrap of its mean. A group may itself be a list of groups (nested repetitions: the attack runs
    ``[run] attack_seeds`` repeats within one run seed, which share that seed's key and embedding): resampled at
    each level in turn (run seeds, then attack runs within each drawn seed, then images), each member of a level
    counting equally. Deterministic for ``seed``; ``n`` = the number of values in all groups.
    """
    groups = list(groups)
    if not groups:
        return Estimate(math.nan, math.nan, math.nan, 0)
    tree = _as_tree(groups)
    if isinstance(tree, np.ndarray):
        raise ValueError("hierarchical bootstrap: give a list of groups")
    reps = _tree_replicates(tree, np.random.default_rng(seed), n_boot)
    lo, hi = np.percentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Estimate(_tree_mean(tree), float(lo), float(hi), _tree_size(tree))


def _tree_leaves(tree: Any) -> list[Any]:
    if isinstance(tree, (np.ndarray, Placements)):
        return [tree]
    return [leaf for c in tree for leaf in _tree_leaves(c)]


def is_binary(groups: Any) -> bool:
    """Whether every per-image value of ``groups`` (nested as :func:`hierarchical_bootstrap` takes them) is 0 or 1."""
    leaves = _tree_leaves(_as_tree(list(groups)))
    return bool(leaves) and all(isinstance(leaf, np.ndarray) and np.isin(leaf, (0.0, 1.0)).all() for leaf in leaves)


def hierarchical_rate(groups: Any, *, seed: int = 0, n_boot: int = 2000, alpha: float = 0.05) -> Estimate:
    """A rate over several repetitions (0/1 per-image outcomes, nested as for :func:`hierarchical_bootstrap`): the
    hierarchical bootstrap's value, with the *envelope* of its interval and the exact Clopper-Pearson interval of
    the pooled count (k of n outcomes).

    Why: the bootstrap can only show variance it has observed. Every repetition all 0 (or all 1) gives it nothing to
    resample, so it reports [0, 0], narrower than one repetition alone (N = 32: [0, 0.109]); and with few
    repetitions its percentile interval is too narrow in general. The pooled count's exact interval is the floor of
    the uncertainty from image sampling alone (what the images could show if the repetitions agreed); the bootstrap
    adds the spread between repetitions where there is one. The envelope keeps both. One repetition of one image set
    is not affected where callers (the leaderboard) report its own Clopper-Pearson interval unchanged.
    """
    groups = list(groups)
    est = hierarchical_bootstrap(groups, seed=seed, n_boot=n_boot, alpha=alpha)
    if not groups:
        return est
    leaves = _tree_leaves(_as_tree(groups))
    if not all(np.isin(leaf, (0.0, 1.0)).all() for leaf in leaves):
        raise ValueError("hierarchical_rate: every per-image value must be 0 or 1")
    k, n = int(sum(leaf.sum() for leaf in leaves)), int(sum(leaf.size for leaf in leaves))
    low, high = clopper_pearson(k, n, alpha)
    return Estimate(est.value, min(est.low, low), max(est.high, high), est.n)


def bit_accuracy(matches_per_image: Any, n_bits: int, generator_seed: int = 0, n_boot: int = 2000) -> Estimate:
    """Mean per-image bit accuracy ``matches / n_bits`` with a 95% percentile bootstrap interval over images.

    Images are resampled, not bits: the bits of one image share the image's fate (an attack that defeats the
    decoder flips many of them at once), so they are not independent and a binomial interval over all
    ``N * n_bits`` bits would be far too narrow. Deterministic for a given ``generator_seed``. ``n`` = number of
    images.
    """
    m = np.asarray(matches_per_image, dtype=float).ravel()
    if n_bits <= 0:
        raise ValueError(f"n_bits must be > 0, got {n_bits}")
    return bootstrap(m / float(n_bits), "mean", seed=generator_seed, n_boot=n_boot)


def mean_t_interval(values: Any, alpha: float = 0.05) -> Estimate:
    """Mean with the Student-t ``1 - alpha`` interval ``mean +- t_{1-alpha/2, n-1} * sd / sqrt(n)``.

    ``n = 1`` gives ``nan`` bounds (no spread to estimate); all-equal values give a zero-width interval.
    """
    x = np.asarray(values, dtype=float).ravel()
    n = x.size
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Estimate(mean, math.nan, math.nan, 1)
    half = float(_st.t.ppf(1 - alpha / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


def rate(k: int, n: int, alpha: float = 0.05) -> Estimate:
    """The proportion ``k / n`` with its exact Clopper-Pearson interval (``nan`` value when ``n = 0``)."""
    low, high = clopper_pearson(k, n, alpha)
    return Estimate(k / n if n else math.nan, low, high, int(n))


# ---------------------------------------------------------------------------------------------------------------
# Operating points
# ---------------------------------------------------------------------------------------------------------------
def tpr_at_fpr_bits(pos_matches: Any, neg_matches: Any, n_bits: int, fpr: float) -> BitsOperatingPoint:
    """TPR on the positives and the empirical FPR on the negatives at the analytic threshold
    ``tau = bit_threshold(n_bits, fpr)`` (detected iff matches >= tau), each with a Clopper-Pearson interval."""
    tau = bit_threshold(n_bits, fpr)
    pos = np.asarray(pos_matches).ravel()
    neg = np.asarray(neg_matches).ravel()
    return BitsOperatingPoint(
        target_fpr=float(fpr), n_bits=int(n_bits), threshold=tau,
        analytic_fpr=binomial_pvalue(tau, n_bits) if tau <= n_bits else 0.0,
        tpr=rate(int((pos >= tau).sum()), pos.size),
        fpr=rate(int((neg >= tau).sum()), neg.size),
    )


def roc_auc(pos_scores: Any, neg_scores: Any, *, seed: int = 0, n_boot: int = 2000,
            alpha: float = 0.05) -> Estimate:
    """ROC AUC = P(S_pos > S_neg) + 0.5 P(S_pos = S_neg) (Mann-Whitney U / (n_pos n_neg), ties count half).

    Interval: ``1 - alpha`` percentile bootstrap, stratified (positives and negatives resampled separately, sizes
    kept), deterministic for ``seed``. Perfect separation gives ``[1, 1]``. ``n`` = n_pos + n_neg; ``nan`` if
    either set is empty.
    """
    pos = np.asarray(pos_scores, dtype=float).ravel()
    neg = np.asarray(neg_scores, dtype=float).ravel()
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        return Estimate(math.nan, math.nan, math.nan, n_pos + n_neg)

    # Each positive's placement among the sorted negatives: the negatives strictly below it are sorted_neg[:left],
    # those not above it sorted_neg[:right]. A bootstrap replicate only reweights the samples (multinomial counts),
    # so a replicate's AUC is a weighted sum of cumulative negative counts at these fixed positions.
    sorted_neg = np.sort(neg)
    left = np.searchsorted(sorted_neg, pos, side="left")
    right = np.searchsorted(sorted_neg, pos, side="right")
    value = float((left + right).sum()) / (2.0 * n_pos * n_neg)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 4_000_000 // (n_pos + n_neg + 1)))
    reps = []
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        w_neg = _resample_counts(rng, n_neg, b)
        w_pos = _resample_counts(rng, n_pos, b)
        cum = np.concatenate([np.zeros((b, 1)), np.cumsum(w_neg, axis=1)], axis=1)
        placement = cum[:, left] + cum[:, right]  # 2 * (below + 0.5 * tied), per positive
        reps.append((w_pos * placement).sum(axis=1) / (2.0 * n_pos * n_neg))
        done += b
    lo, hi = np.percentile(np.concatenate(reps), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Estimate(value, float(lo), float(hi), n_pos + n_neg)


def _resample_counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """``[b, n]`` multiplicities of the n samples in b bootstrap resamples (each drawing n with replacement)."""
    idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def _allowed_false_positives(n_neg: int, fpr: float) -> int:
    return int(math.floor(fpr * n_neg * (1 + _EPS)))


def empirical_threshold(neg_scores: Any, fpr: float) -> tuple[float, bool]:
    """Threshold on scores for a target FPR, set on the negatives; detected iff score > threshold.

    With the negatives sorted ascending ``s_1 <= ... <= s_n`` and ``k = floor(fpr * n)`` false positives allowed,
    the threshold is ``s_(n-k)``: at most k negatives lie strictly above it, and it is the lowest negative score
    with that property, so the empirical FPR is the largest achievable fraction <= fpr (ties can make it
    smaller). ``resolvable`` is False when ``n < 1/fpr``: then k = 0, the threshold is the maximum negative score
    and the empirical FPR is 0, which does not show the FPR is as low as ``fpr``. ``fpr >= 1`` gives ``-inf``
    (everything detected); no negatives give ``(inf, False)`` (nothing detected).
    """
    neg = np.sort(np.asarray(neg_scores, dtype=float).ravel())
    n = neg.size
    if n == 0:
        return math.inf, False
    k = _allowed_false_positives(n, fpr)
    resolvable = fpr * n * (1 + _EPS) >= 1.0
    if k >= n:
        return -math.inf, resolvable
    return float(neg[n - 1 - k]), resolvable


def analytic_fpr_label(fpr: float) -> str:
    """The name suffix of an analytic (binomial-threshold) operating point: ``1e-06`` (``tpr@1e-06``).

    Only thresholds that guarantee their FPR under a null model (:func:`bit_threshold`) carry a bare number."""
    return f"{float(fpr):g}"


def empirical_fpr_label(n_neg: int, fpr: float) -> str:
    """The name suffix of an empirical (negatives-set) operating point: the FPR that ``n_neg`` negatives resolve.

    The threshold of :func:`empirical_threshold` lets ``k = floor(fpr * n_neg)`` negatives score above it, so it is
    labelled ``fpr<=k/n_neg``; when ``n_neg < 1/fpr`` (k = 0: the threshold is the maximum negative score) the FPR
    it can resolve is one negative in ``n_neg``: ``fpr<=1/n_neg`` (e.g. target 1e-6 on 32 negatives gives
    ``fpr<=1/32``, so the metric is ``tpr@fpr<=1/32``, never ``tpr@1e-06``). The fraction is not reduced, so the
    label keeps the number of negatives.
    """
    n = int(n_neg)
    if n <= 0:
        raise ValueError(f"an empirical FPR label needs at least one negative, got {n_neg}")
    k = min(_allowed_false_positives(n, fpr), n)
    return f"fpr<={max(k, 1)}/{n}"


def tpr_at_fpr_scores(pos_scores: Any, neg_scores: Any, fpr: float) -> ScoreOperatingPoint:
    """TPR and empirical FPR (Clopper-Pearson intervals) at :func:`empirical_threshold` (detected iff score >
    threshold); ``note`` explains an unresolvable FPR."""
    pos = np.asarray(pos_scores, dtype=float).ravel()
    neg = np.asarray(neg_scores, dtype=float).ravel()
    threshold, resolvable = empirical_threshold(neg, fpr)
    note = ""
    if neg.size == 0:
        note = f"no negatives: cannot set a threshold for FPR {fpr:g}"
    elif not resolvable:
        needed = math.ceil(1.0 / fpr * (1 - _EPS)) if fpr > 0 else math.inf
        note = (f"N_neg={neg.size} cannot resolve FPR {fpr:g} (needs >= {needed} negatives); "
                f"threshold = max negative score")
    return ScoreOperatingPoint(
        target_fpr=float(fpr), threshold=threshold, resolvable=resolvable,
        tpr=rate(int((pos > threshold).sum()), pos.size),
        fpr=rate(int((neg > threshold).sum()), neg.size),
        note=note,
    )
