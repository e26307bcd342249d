"""Built-in metrics on hand-built MeasureContexts: detection metrics and image quality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from markbench import stats
from markbench.plugins import Defense, Detection, DetectionKind, MeasureContext, Measurement
from markbench.registries import builtin_table
from markbench.registries import metrics as registry

K = 48


class FakeBits(Defense):
    """Unregistered multi-bit defence (only ``detection`` is read by the metrics)."""

    detection = DetectionKind.BITS


class FakeScore(Defense):
    """Unregistered zero-bit defence."""

    detection = DetectionKind.SCORE


def metric(name):
    return registry.get(name)()


def by_name(ms: list[Measurement]) -> dict[str, Measurement]:
    names = [m.name for m in ms]
    assert len(names) == len(set(names)), names
    return {m.name: m for m in ms}


def bits_ctx(pos_bits, neg_bits, message, fprs=(1e-6, 1e-2)):
    return MeasureContext(defense=FakeBits(), detection=Detection(bits=pos_bits), negatives=Detection(bits=neg_bits),
                          message=message, target_fprs=tuple(fprs), generator=torch.Generator().manual_seed(0))


def score_ctx(pos, neg, fprs=(1e-6, 0.1)):
    return MeasureContext(defense=FakeScore(), detection=Detection(scores=torch.as_tensor(pos)),
                          negatives=Detection(scores=torch.as_tensor(neg)), message=None,
                          target_fprs=tuple(fprs), generator=torch.Generator().manual_seed(0))


def with_matches(message: torch.Tensor, matches: list[int], g: torch.Generator) -> torch.Tensor:
    """Bits agreeing with ``message`` in exactly ``matches[i]`` (random) positions."""
    rows = []
    for m in matches:
        flip = torch.zeros(K, dtype=torch.bool)
        flip[torch.randperm(K, generator=g)[: K - m]] = True
        rows.append(message ^ flip)
    return torch.stack(rows)


@pytest.fixture
def g():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def message(g):
    return torch.rand(K, generator=g) < 0.5


def test_registry_names_and_classes():
    for name, target in builtin_table("metrics").items():
        cls = registry.get(name)
        assert f"{cls.__module__}:{cls.__name__}" == target
        assert cls.name == name and cls.version.isdigit() and cls.summary()
    assert registry.get("psnr").needs_images and registry.get("ssim").needs_images
    assert not registry.get("tpr").needs_images


# ---------------------------------------------------------------------------------------------------------------
# Multi-bit defences
# ---------------------------------------------------------------------------------------------------------------
def test_perfect_watermark(message, g):
    n_pos, n_neg = 64, 300
    pos = message.repeat(n_pos, 1)
    neg = torch.rand(n_neg, K, generator=g) < 0.5
    ctx = bits_ctx(pos, neg, message)

    acc = by_name(metric("bit_accuracy").compute(ctx))
    assert acc["bit_accuracy"].value == 1.0 and acc["bit_accuracy"].n == n_pos
    assert acc["bit_accuracy"].higher_is_better is True
    neg_acc = acc["bit_accuracy_neg"]
    assert neg_acc.n == n_neg and neg_acc.low < 0.5 < neg_acc.high
    ref = ((neg == message).sum(1).double() / K).mean().item()
    assert neg_acc.value == pytest.approx(ref)

    tpr = by_name(metric("tpr").compute(ctx))
    assert set(tpr) == {"tpr@1e-06", "fpr@1e-06", "tpr@0.01", "fpr@0.01"}
    t = tpr["tpr@1e-06"]
    assert (t.value, t.n, t.high) == (1.0, n_pos, 1.0)
    assert t.low == pytest.approx(st.binomtest(n_pos, n_pos).proportion_ci(method="exact").low)
    assert "matches >= 41 of 48" in t.note and t.higher_is_better is True
    f = tpr["fpr@1e-06"]
    assert f.n == n_neg and f.higher_is_better is False
    neg_matches = (neg == message).sum(1)
    assert f.value == (neg_matches >= 41).float().mean().item() == 0.0
    assert "cannot resolve" in f.note  # 300 negatives are too few to check 1e-6 empirically
    tau = stats.bit_threshold(K, 1e-2)
    assert tpr["fpr@0.01"].value == pytest.approx((neg_matches >= tau).double().mean().item())

    pv = by_name(metric("pvalue").compute(ctx))["log10_pvalue_median"]
    assert pv.value == pytest.approx(-K * math.log10(2)) and pv.n == n_pos and pv.higher_is_better is False

    auc = by_name(metric("auc").compute(ctx))["auc"]
    assert auc.value == 1.0 and auc.n == n_pos + n_neg


def test_random_bits_are_not_detected(message, g):
    pos = torch.rand(200, K, generator=g) < 0.5
    neg = torch.rand(200, K, generator=g) < 0.5
    ctx = bits_ctx(pos, neg, message)
    acc = by_name(metric("bit_accuracy").compute(ctx))["bit_accuracy"]
    assert acc.low < 0.5 < acc.high
    tpr = by_name(metric("tpr").compute(ctx))
    assert tpr["tpr@1e-06"].value == 0.0
    assert tpr["tpr@0.01"].value <= 0.05
    assert tpr["tpr@1e-06"].high == pytest.approx(stats.clopper_pearson(0, 200)[1])
    auc = by_name(metric("auc").compute(ctx))["auc"]
    assert auc.low < 0.5 < auc.high
    pv = by_name(metric("pvalue").compute(ctx))["log10_pvalue_median"]
    assert -1.0 < pv.value <= 0.0


def test_threshold_boundary_41_of_48(message, g):
    matches = [41, 41, 40, 40, 48, 0]
    pos = with_matches(message, matches, g)
    assert (pos == message).sum(1).tolist() == matches
    ctx = bits_ctx(pos, pos[:0], message, fprs=(1e-6,))
    ms = by_name(metric("tpr").compute(ctx))
    assert set(ms) == {"tpr@1e-06"}  # no negatives: no empirical FPR
    assert ms["tpr@1e-06"].value == pytest.approx(3 / 6)
    assert (ms["tpr@1e-06"].low, ms["tpr@1e-06"].high) == pytest.approx(stats.clopper_pearson(3, 6))
    acc = by_name(metric("bit_accuracy").compute(ctx))
    assert set(acc) == {"bit_accuracy"}
    assert acc["bit_accuracy"].value == pytest.approx(sum(matches) / (6 * K))
    pv = by_name(metric("pvalue").compute(ctx))["log10_pvalue_median"]
    ref = np.median(np.log10(st.binom.sf(np.array(matches) - 1, K, 0.5)))
    assert pv.value == pytest.approx(ref)
    assert metric("auc").compute(ctx) == []


def test_auc_bits_uses_matches(message, g):
    pos_m, neg_m = [48, 40, 30, 24, 24], [24, 30, 20, 26]
    ctx = bits_ctx(with_matches(message, pos_m, g), with_matches(message, neg_m, g), message)
    auc = by_name(metric("auc").compute(ctx))["auc"]
    brute = np.mean([[1.0 if p > q else 0.5 if p == q else 0.0 for q in neg_m] for p in pos_m])
    assert auc.value == pytest.approx(brute)


def test_bits_shape_mismatch_is_an_error(message):
    ctx = bits_ctx(torch.zeros(3, 32, dtype=torch.bool), None, message)
    with pytest.raises(ValueError, match="32"):
        metric("bit_accuracy").compute(ctx)


def test_metrics_are_deterministic(message, g):
    pos = with_matches(message, list(range(30, 48)), g)
    neg = torch.rand(50, K, generator=g) < 0.5
    for name in ("bit_accuracy", "tpr", "pvalue", "auc"):
        a = metric(name).compute(bits_ctx(pos, neg, message))
        b = metric(name).compute(bits_ctx(pos, neg, message))
        assert a == b, name


def test_score_targets_that_the_negatives_cannot_tell_apart_are_reported_once():
    """1e-6 and 1e-3 both leave 0 of 32 negatives above the threshold: one operating point, labelled 1/32."""
    rng = np.random.default_rng(1)
    ms = by_name(metric("tpr").compute(score_ctx(rng.normal(2, 1, 8), rng.normal(0, 1, 32), fprs=(1e-6, 1e-3))))
    assert set(ms) == {"tpr@fpr<=1/32", "fpr@fpr<=1/32"}
    assert "target FPR 1e-06" in ms["tpr@fpr<=1/32"].note


# ---------------------------------------------------------------------------------------------------------------
# Zero-bit (score) defences
# ---------------------------------------------------------------------------------------------------------------
def test_score_defence():
    rng = np.random.default_rng(5)
    pos = rng.normal(3.0, 1.0, 40)
    neg = rng.normal(0.0, 1.0, 16)
    ctx = score_ctx(pos, neg, fprs=(1e-6, 0.125))
    assert metric("bit_accuracy").compute(ctx) == []
    assert metric("pvalue").compute(ctx) == []

    ms = by_name(metric("tpr").compute(ctx))
    # an empirical threshold is named by the FPR its 16 negatives resolve, never by the unreachable target 1e-6
    assert set(ms) == {"tpr@fpr<=1/16", "fpr@fpr<=1/16", "tpr@fpr<=2/16", "fpr@fpr<=2/16"}
    t = ms["tpr@fpr<=1/16"]
    assert t.value == pytest.approx((pos > neg.max()).mean()) and t.n == 40
    assert "N_neg=16 cannot resolve FPR 1e-06 (needs >= 1000000 negatives)" in t.note
    assert "not an analytic guarantee" in t.note
    assert ms["fpr@fpr<=1/16"].value == 0.0 and ms["fpr@fpr<=1/16"].n == 16
    # 0.125 * 16 = 2 negatives allowed above the threshold: the 3rd-highest negative
    thr = np.sort(neg)[-3]
    assert ms["tpr@fpr<=2/16"].value == pytest.approx((pos > thr).mean())
    assert ms["fpr@fpr<=2/16"].value == pytest.approx(2 / 16)
    assert "cannot resolve" not in ms["tpr@fpr<=2/16"].note

    auc = by_name(metric("auc").compute(ctx))["auc"]
    brute = np.mean([[1.0 if p > q else 0.5 if p == q else 0.0 for q in neg] for p in pos])
    assert auc.value == pytest.approx(brute)
    assert 0 <= auc.low <= auc.value <= auc.high <= 1


def test_score_defence_without_negatives():
    ctx = score_ctx([1.0, 2.0], torch.zeros(0))
    assert metric("tpr").compute(ctx) == []
    assert metric("auc").compute(ctx) == []


# ---------------------------------------------------------------------------------------------------------------
# Image quality
# ---------------------------------------------------------------------------------------------------------------
def image_ctx(images, unattacked, clean):
    return MeasureContext(defense=FakeBits(), detection=Detection(), negatives=Detection(), message=None,
                          target_fprs=(), generator=torch.Generator().manual_seed(0),
                          loaders={"images": lambda: images, "unattacked": lambda: unattacked,
                                   "clean_twins": lambda: clean})


def numpy_psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double().numpy(), b.double().numpy()
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    return 10 * np.log10(1.0 / mse)


def test_psnr_against_numpy(g):
    clean = torch.rand(6, 3, 32, 32, generator=g)
    marked = (clean + 0.02 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    attacked = (marked + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    ms = by_name(metric("psnr").compute(image_ctx(attacked, marked, clean)))
    assert set(ms) == {"psnr_watermark", "psnr_attack"}
    for name, (a, b) in {"psnr_watermark": (marked, clean), "psnr_attack": (attacked, marked)}.items():
        ref = numpy_psnr(a, b)
        m = ms[name]
        assert m.value == pytest.approx(ref.mean(), rel=1e-4) and m.n == 6 and m.higher_is_better is True
        lo, hi = st.t.interval(0.95, 5, loc=ref.mean(), scale=st.sem(ref))
        assert (m.low, m.high) == (pytest.approx(lo, rel=1e-3), pytest.approx(hi, rel=1e-3))
    assert ms["psnr_watermark"].value > ms["psnr_attack"].value


@pytest.mark.parametrize("name", ["psnr", "ssim"])
def test_the_marks_cost_is_measured_against_the_right_twin_not_the_plain_clean_image(g, name):
    """A trigger defence: the plain clean image differs from the triggered clean image (the trigger's own effect);
    the mark's cost is the distance to the triggered clean image (the twin), and a mark in the initial noise has no
    paired twin, so nothing is reported for it."""
    plain = torch.rand(4, 3, 32, 32, generator=g)
    twin = torch.rand(4, 3, 32, 32, generator=g)  # what the trigger alone does: unrelated content
    marked = (twin + 0.01 * torch.randn(twin.shape, generator=g)).clamp(0, 1)
    ctx = image_ctx(marked, marked, plain)
    ctx.loaders = dict(ctx.loaders, twins=lambda: twin)
    ms = by_name(metric(name).compute(ctx))
    expected = by_name(metric(name).compute(image_ctx(marked, marked, twin)))[f"{name}_watermark"]
    wrong = by_name(metric(name).compute(image_ctx(marked, marked, plain)))[f"{name}_watermark"]
    assert ms[f"{name}_watermark"].value == pytest.approx(expected.value)
    assert ms[f"{name}_watermark"].value > wrong.value + (10 if name == "psnr" else 0.3)
    ctx.paired_twin = False  # a mark in the initial noise: no pixel-aligned twin, so the mark's cost is not measured
    unpaired = by_name(metric(name).compute(ctx))
    assert set(unpaired) == {f"{name}_attack", f"{name}_watermark"}
    assert math.isnan(unpaired[f"{name}_watermark"].value) and "not applicable" in unpaired[f"{name}_watermark"].note


def test_psnr_identical_images_capped_at_100():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ms = by_name(metric("psnr").compute(image_ctx(x, x.clone(), x.clone())))
    for m in ms.values():
        assert (m.value, m.low, m.high) == (100.0, 100.0, 100.0)
        assert "cap" in m.note


def test_psnr_resizes_when_the_attack_changed_the_size(g):
    clean = torch.rand(2, 3, 32, 32, generator=g)
    attacked = clean[:, :, :24, :24]
    ms = by_name(metric("psnr").compute(image_ctx(attacked, clean, clean)))
    assert "resized from 24x24 to 32x32" in ms["psnr_attack"].note
    assert math.isfinite(ms["psnr_attack"].value)


def test_ssim_analytic_constant_images():
    # Constant images: all variances and covariances are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    a, b = 0.5, 0.6
    clean = torch.full((2, 3, 32, 32), a)
    marked = torch.full((2, 3, 32, 32), b)
    ms = by_name(metric("ssim").compute(image_ctx(marked, marked, clean)))
    c1 = 0.01**2
    assert ms["ssim_watermark"].value == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    # identical flat images: 1 up to float32 rounding of the local variances (documented)
    assert ms["ssim_attack"].value == pytest.approx(1.0, abs=1e-3)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert by_name(metric("ssim").compute(image_ctx(x, x.clone(), x.clone())))["ssim_attack"].value == \
        pytest.approx(1.0, abs=1e-5)


def test_ssim_decreases_with_noise(g):
    clean = torch.rand(4, 3, 32, 32, generator=g)
    light = (clean + 0.02 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    heavy = (light + 0.2 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    ms = by_name(metric("ssim").compute(image_ctx(heavy, light, clean)))
    assert 0 < ms["ssim_attack"].value < ms["ssim_watermark"].value < 1
    assert ms["ssim_watermark"].n == 4 and ms["ssim_watermark"].low <= ms["ssim_watermark"].value
