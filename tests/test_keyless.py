"""Keyless detectability: the Laplacian-energy AUC against scipy's Mann-Whitney U, the classifier's fit against
scipy's optimiser, and both on a visible synthetic mark (AUC about 1) and on identical sets (AUC 0.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize
from scipy import stats as st

from markbench.measures import keyless
from markbench.plugins import Defense, Detection, DetectionKind, MeasureContext
from markbench.registries import metrics


class _Bits(Defense):
    detection = DetectionKind.BITS


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Smooth random colour fields (upsampled 4x4 noise) plus a little fine noise: images with some texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def ctx_of(marked: torch.Tensor, twins: torch.Tensor, seed: int = 0) -> MeasureContext:
    return MeasureContext(defense=_Bits(), detection=Detection(), negatives=Detection(), message=None,
                          target_fprs=(), generator=torch.Generator().manual_seed(seed),
                          loaders={"images": lambda: marked, "unattacked": lambda: marked,
                                   "clean_twins": lambda: twins, "twins": lambda: twins})


def compute(marked, twins, seed=0):
    return {m.name: m for m in metrics.get("keyless")().compute(ctx_of(marked, twins, seed))}


def checkerboard(size: int = 32, amplitude: float = 0.06) -> torch.Tensor:
    i = torch.arange(size)
    return amplitude * ((i[:, None] + i[None, :]) % 2 * 2 - 1).float()


def test_laplacian_energy_against_a_direct_loop():
    x = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(0)).double()
    ref = []
    for img in x.numpy():
        lap = (img[:, :-2, 1:-1] + img[:, 2:, 1:-1] + img[:, 1:-1, :-2] + img[:, 1:-1, 2:] - 4 * img[:, 1:-1, 1:-1])
        ref.append((lap ** 2).mean())
    np.testing.assert_allclose(keyless.laplacian_energy(x), ref, rtol=1e-12)


def test_keyless_auc_is_mann_whitney_u_over_n1_n2():
    marked, twins = smooth_images(24, 1), smooth_images(20, 2)
    m = compute(marked, twins)["keyless_auc"]
    u = st.mannwhitneyu(keyless.laplacian_energy(marked), keyless.laplacian_energy(twins)).statistic
    assert m.value == pytest.approx(u / (24 * 20)) and m.n == 44
    assert m.low <= m.value <= m.high and m.high - m.low > 0.05


def test_a_visible_mark_reads_about_1_and_identical_sets_exactly_one_half():
    twins = smooth_images(32, 3)
    marked = (twins + checkerboard()).clamp(0, 1)  # a faint high-frequency texture: anyone can measure it
    visible = compute(marked, twins)
    assert visible["keyless_auc"].value >= 0.99
    assert visible["keyless_classifier_auc"].value >= 0.95
    same = compute(twins.clone(), twins)
    assert same["keyless_auc"].value == 0.5  # every pair ties
    assert same["keyless_classifier_auc"].value == 0.5  # the held-out scores of both sets are the same multiset
    assert same["keyless_auc"].low <= 0.5 <= same["keyless_auc"].high


def test_an_unrelated_sample_of_the_same_distribution_reads_near_chance():
    """Two independent draws of the same distribution (no mark): the classifier's held-out AUC stays near 0.5."""
    values = [compute(smooth_images(32, 10 + 2 * s), smooth_images(32, 11 + 2 * s), s)["keyless_classifier_auc"].value
              for s in range(6)]
    assert abs(np.mean(values) - 0.5) < 0.1  # the null's spread is about 0.09 per draw at this N
    assert max(values) < 0.8


def test_the_classifier_split_is_seeded_by_the_harness_generator():
    twins = smooth_images(16, 6)
    marked = (twins + 0.3 * checkerboard(amplitude=0.02)).clamp(0, 1)
    a, b, c = (compute(marked, twins, seed)["keyless_classifier_auc"].value for seed in (0, 0, 1))
    assert a == b
    assert 0.0 <= c <= 1.0


def test_fit_logistic_matches_scipys_optimiser():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x @ [1.5, -2.0, 0.5] + rng.normal(size=40) > 0).astype(float)
    w, b = keyless.fit_logistic(x, y, l2=0.7)

    def loss(theta):
        z = x @ theta[:3] + theta[3]
        return np.sum(np.logaddexp(0, -(2 * y - 1) * z)) + 0.35 * theta[:3] @ theta[:3]

    ref = optimize.minimize(loss, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(np.append(w, b), ref, atol=1e-5)


def test_image_statistics_shape_and_meaning():
    flat = torch.full((2, 3, 16, 16), 0.25)
    f = keyless.image_statistics(flat)
    assert f.shape == (2, len(keyless.FEATURES))
    cols = dict(zip(keyless.FEATURES, f[0]))
    assert cols["mean_r"] == pytest.approx(0.25) and cols["std_g"] == 0 and cols["saturation"] == 0
    assert cols["high_frequency_share"] == 0  # a flat image has no spectral power at all
    assert keyless.image_statistics((flat + checkerboard(16)).clamp(0, 1))[0, 2] == pytest.approx(1.0)
