"""Keyless detectability: can someone *without the key* tell marked images from their clean twins?

A watermark is meant to be invisible; a mark strong enough to be seen survives attacks by construction, so every
detection number needs this beside it. Both measurements compare ``ctx.unattacked_images()`` (marked, before the
image attack) with ``ctx.twins()``, the right twin (the equally attacked clean model's images made the same way:
for a trigger defence the clean model given the trigger; :class:`bench.plugins.MeasureContext`). Neither reads the
defence's secret.

``keyless_auc``
    ROC AUC of one number per image that needs no key: the **mean Laplacian energy**
    (:func:`laplacian_energy`: the mean over channels and interior pixels of the squared response of the 3x3
    Laplacian ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` on the image in [0, 1]), marked images as positives, twins as
    negatives (Mann-Whitney, ties count half). 0.5: the statistic cannot tell them apart; near 1: the mark adds
    high-frequency energy anyone can measure; near 0: it removes it (just as visible: read the distance from 0.5).
    95% stratified bootstrap (:func:`bench.stats.roc_auc`).
``keyless_classifier_auc``
    A small classifier trained without the key: L2-regularised logistic regression (:func:`fit_logistic`, Newton's
    method, penalty ``l2`` on the standardised weights, not on the intercept) on :data:`FEATURES` image statistics
    (:func:`image_statistics`). Two-fold cross-fitting over *pairs*: the pairs (marked image i, its twin i) are
    split at random in halves (a permutation drawn from the cell's ``ctx.generator``, so it is seeded by the
    harness), the classifier is trained on one half and scores the other, then the other way round; a pair never
    sits on both sides, so the classifier cannot win by recognising content (``repeats`` > 1 averages each image's
    held-out scores over several splits). The AUC of the held-out scores with a 95% stratified bootstrap over
    images, given the trained classifiers: it leaves out the training's own variance, so under the null it is
    somewhat narrow (40 null simulations of 48 + 48 images: the AUC's spread across draws was 0.071 with one split,
    0.089 averaged over 5 splits, against the 0.059 of a Mann-Whitney AUC; hence one split by default). Its
    orientation is learnt, so it reads 0.5 for indistinguishable sets and towards 1 for a visible mark (below 0.5
    only by chance).

Both need at least 2 pairs (the classifier at least 4); otherwise nothing is reported.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from markbench import param, stats
from markbench.plugins import MeasureContext, Measurement, Metric
from markbench.registries import metrics

_SEED = 0  # bootstrap seed: intervals depend on the data only
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])

#: The classifier's per-image statistics, in the column order of :func:`image_statistics`.
FEATURES = ("log_laplacian_energy", "log_gradient_energy", "high_frequency_share", "mean_r", "mean_g", "mean_b",
            "std_r", "std_g", "std_b", "saturation")


def laplacian_energy(images: torch.Tensor) -> np.ndarray:
    """Mean squared 3x3 Laplacian response per image (float64 ``[N]``; interior pixels, all channels)."""
    x = images.detach().double().cpu()
    if x.ndim != 4 or min(x.shape[-2:]) < 3:
        raise ValueError(f"laplacian_energy needs images [N, C, H, W] of at least 3x3, got {tuple(x.shape)}")
    c = x.shape[1]
    k = _LAPLACIAN.double().expand(c, 1, 3, 3)
    return F.conv2d(x, k, groups=c).pow(2).mean(dim=(1, 2, 3)).numpy()


def image_statistics(images: torch.Tensor) -> np.ndarray:
    """The :data:`FEATURES` of each image (float64 ``[N, 10]``): log Laplacian and gradient energy, the share of
    spectral power above half the Nyquist frequency (grey level), per-channel mean and standard deviation, and
    the mean saturation (max - min over channels)."""
    x = images.detach().double().cpu().clamp(0, 1)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image_statistics needs RGB images [N, 3, H, W], got {tuple(x.shape)}")
    lap = np.log(laplacian_energy(x) + 1e-12)
    gx, gy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    grad = np.log((gx.pow(2).mean(dim=(1, 2, 3)) + gy.pow(2).mean(dim=(1, 2, 3))).numpy() + 1e-12)
    grey = x.mean(dim=1)
    power = torch.fft.fft2(grey - grey.mean(dim=(-2, -1), keepdim=True)).abs().pow(2)
    fy = torch.fft.fftfreq(grey.shape[-2], dtype=torch.float64).abs()[:, None]
    fx = torch.fft.fftfreq(grey.shape[-1], dtype=torch.float64).abs()[None, :]
    high = (torch.maximum(fy, fx) > 0.25).double()
    total = power.sum(dim=(-2, -1))
    share = torch.where(total > 0, (power * high).sum(dim=(-2, -1)) / total.clamp_min(1e-300),
                        torch.zeros_like(total)).numpy()
    mean = x.mean(dim=(2, 3)).numpy()
    std = x.std(dim=(2, 3)).numpy()
    sat = (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2)).numpy()
    return np.column_stack([lap, grad, share, mean, std, sat])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 100) -> tuple[np.ndarray, float]:
    """Weights and intercept minimising ``sum_i log(1 + exp(-s_i (x_i w + b))) + l2/2 |w|^2`` (``s_i = 2 y_i - 1``).

    Newton's method on the convex objective (the intercept unpenalised); deterministic. ``x`` ``[n, d]``, ``y`` in
    {0, 1}."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float).ravel()
    n, d = x.shape
    a = np.column_stack([x, np.ones(n)])
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, float(l2))
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (p - y) + reg * theta
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def cross_fitted_scores(pos_features: np.ndarray, neg_features: np.ndarray, generator: torch.Generator,
                        l2: float = 1.0, repeats: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Held-out classifier scores of every positive and negative: two-fold cross-fitting over pairs (pair i =
    positive i and negative i), each split a permutation drawn from ``generator``; features standardised on the
    training fold. Repeated over ``repeats`` splits and averaged per image (every model that scores an image was
    trained without it and without its pair)."""
    n = pos_features.shape[0]
    if neg_features.shape[0] != n:
        raise ValueError(f"cross-fitting needs pairs: {n} positives but {neg_features.shape[0]} negatives")
    pos_s, neg_s = np.zeros(n), np.zeros(n)
    for _ in range(int(repeats)):
        perm = torch.randperm(n, generator=generator).numpy()
        folds = (perm[: n // 2], perm[n // 2:])
        for train, test in (folds, folds[::-1]):
            xt = np.concatenate([pos_features[train], neg_features[train]])
            yt = np.concatenate([np.ones(len(train)), np.zeros(len(train))])
            mu, sd = xt.mean(axis=0), xt.std(axis=0)
            sd = np.where(sd > 1e-12, sd, 1.0)
            w, b = fit_logistic((xt - mu) / sd, yt, l2)
            pos_s[test] += ((pos_features[test] - mu) / sd) @ w + b
            neg_s[test] += ((neg_features[test] - mu) / sd) @ w + b
    return pos_s / repeats, neg_s / repeats


def _measurement(name: str, est: stats.Estimate, note: str, higher_is_better: bool | None) -> Measurement:
    clean = lambda v: float(v) if v is not None and math.isfinite(v) else None  # noqa: E731
    return Measurement(name=name, value=float(est.value), low=clean(est.low), high=clean(est.high), n=int(est.n),
                       note=note, higher_is_better=higher_is_better)


@metrics.register("keyless")
class KeylessDetectability(Metric):
    """Whether the mark shows without the key: ``keyless_auc`` (mean Laplacian energy) and ``keyless_classifier_auc``
    (logistic regression on image statistics, cross-fitted over pairs), marked images against their right twins.

    0.5 = no keyless test tells them apart (an invisible mark); towards 1 (or, for the fixed statistic, towards 0) =
    anyone can see it. 95% stratified bootstrap. Details in :mod:`bench.measures.keyless`.
    """

    version = "1"
    needs_images = True
    higher_is_better = False
    l2: float = param(1.0, "the classifier's L2 penalty on standardised weights", low=0.0)
    repeats: int = param(1, "random two-fold splits whose held-out scores are averaged per image", low=1)

    @classmethod
    def outputs(cls, params, target_fprs):
        return ("keyless_auc", "keyless_classifier_auc")

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        marked = ctx.unattacked_images()
        twins = ctx.twins()
        n, m = int(marked.shape[0]), int(twins.shape[0])
        if min(n, m) < 2:
            return []
        what = (f"{n} marked images (before the image attack) against {m} right twins (the equally attacked clean "
                f"model's images made the same way); no key used; 0.5 = indistinguishable")
        out = [_measurement(
            "keyless_auc", stats.roc_auc(laplacian_energy(marked), laplacian_energy(twins), seed=_SEED),
            f"ROC AUC of the mean 3x3 Laplacian energy per image, {what} (below 0.5: the mark lowers the energy, "
            f"as visible as above); 95% stratified bootstrap", None)]
        if n == m and n >= 4:
            pos, neg = cross_fitted_scores(image_statistics(marked), image_statistics(twins), ctx.generator,
                                           float(self.params["l2"]), int(self.params["repeats"]))
            out.append(_measurement(
                "keyless_classifier_auc", stats.roc_auc(pos, neg, seed=_SEED),
                f"held-out ROC AUC of a logistic regression (L2 {self.params['l2']:g}) on {len(FEATURES)} image "
                f"statistics ({', '.join(FEATURES)}), two-fold cross-fitted over image pairs, "
                f"{self.params['repeats']} splits drawn from the cell's generator, held-out scores averaged; {what}; "
                f"95% stratified bootstrap over images (given the trained classifiers)", False))
        return out
