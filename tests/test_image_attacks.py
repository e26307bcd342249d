"""Tests of the built-in image attacks (attacks/image/*).

The generic tests are parametrised over ``image_attacks.names()``, so every registered attack (a new built-in or
a third-party one) is exercised without a new test. The specific tests compare against independent references
(Pillow's codec, torchvision's functional ops, closed-form expectations).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from markbench import ConfigError, ImageAttack, image_attacks
from markbench.testing import contract_cases, run_attack

NAMES = [n for n in image_attacks.names() if not n.startswith("_test")]  # tests/plugins_for_tests misbehave
BUILTINS = [n for n in NAMES if image_attacks.origin(n) == "markbench"]
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _natural_images(n: int = 3, size: int = 48, seed: int = 1234) -> torch.Tensor:
    """Image-like test batch: smooth random colour fields plus mild texture, quantised to 8 bits like the harness."""
    g = _gen(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    texture = 0.08 * (torch.rand(n, 3, size, size, generator=g) - 0.5)
    x = (smooth + texture).clamp(0.0, 1.0)
    return (x * 255).round() / 255


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _make(name: str, **params) -> ImageAttack:
    return image_attacks.get(name)(**params)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return _natural_images()


# ---------------------------------------------------------------------------------------------------------------
# The contract (bench.testing), for every registered attack: each check reads what the attack declares about
# itself (deterministic, zero_strength_tolerance, strength_effect, identity), never its name.
# ---------------------------------------------------------------------------------------------------------------
def attack_model():
    """The tiny world's trained pipeline for attacks that need a model (regeneration on random weights says
    little); the micro pipeline where the tiny world is not built."""
    from tests.attack_models import tiny_or_micro

    return tiny_or_micro()


def _contract_cases():
    """Every attack's contract; those that run a diffusion model (seconds per call on a busy CPU) are slow."""
    out = []
    for case in contract_cases((image_attacks.get(n) for n in NAMES), model=attack_model):
        plugin = case.values[0]
        if getattr(plugin, "needs_model", None) and plugin.name in ("regen_diffusion", "rinse"):
            case = pytest.param(*case.values, id=case.id, marks=pytest.mark.slow)
        out.append(case)
    return out


@pytest.mark.parametrize("plugin, check", _contract_cases())
def test_image_attack_contract(plugin, check):
    check(plugin)


def test_strength_is_owned_by_the_base_class():
    """Subclasses declare only natural parameters; the base adds one normalised 'strength' in [0, 1] and clamps."""
    for name in NAMES:
        cls = image_attacks.get(name)
        strength = [p for p in cls.params if p.name == "strength"]
        assert len(strength) == 1 and cls.params[-1] is strength[0], name
        assert (strength[0].low, strength[0].high, strength[0].default, strength[0].optional) == (0.0, 1.0, None, True)
    jpeg = image_attacks.get("jpeg")
    assert jpeg.natural_params(-3.0) == {"quality": 90} and jpeg.natural_params(7.0) == {"quality": 10}
    assert "round(90 - 80 s)" in {p.name: p for p in jpeg.params}["strength"].doc


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_defaults_equal_mid_strength(name, images):
    """Documented design: every built-in's defaults are its strength-0.5 setting."""
    if image_attacks.get(name).needs_model and name in ("regen_diffusion", "rinse"):
        pytest.skip("slow (runs the diffusion model): tests/test_removal_attacks.py checks its defaults")
    model = attack_model() if image_attacks.get(name).needs_model else None
    smoke = image_attacks.get(name).smoke_params
    a = run_attack(_make(name, **smoke), images, _gen(21), model)
    b = run_attack(_make(name, **smoke, strength=0.5), images, _gen(21), model)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,params", [("gaussian_noise", {"std": 0.05}), ("salt_pepper", {"amount": 0.1}),
                                         ("crop", {"scale": 0.5, "mode": "random"})])
def test_random_attacks_draw_per_image_and_per_seed(name, params, images):
    twins = images[:1].repeat(2, 1, 1, 1)
    out = _make(name, **params).apply(twins, _gen(1))
    assert not torch.equal(out[0], out[1]), f"{name}: identical images got identical randomness"
    again = _make(name, **params).apply(twins, _gen(2))
    assert not torch.equal(out, again), f"{name}: different seeds gave identical output"


# ---------------------------------------------------------------------------------------------------------------
# Attack-specific checks against independent references
# ---------------------------------------------------------------------------------------------------------------
def _pil_jpeg(x: torch.Tensor, quality: int) -> np.ndarray:
    out = []
    for img in x:
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return np.stack(out)


@pytest.mark.parametrize("quality", (10, 50, 90))
def test_jpeg_matches_direct_pil_roundtrip(quality, images):
    out = _make("jpeg", quality=quality).apply(images, _gen())
    got = (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    ref = _pil_jpeg(images, quality).astype(int)
    assert np.abs(got - ref).max() <= 1
    assert _make("jpeg", strength=0.5).quality == 50


def test_jpeg_strength_mapping_and_quality_order(images):
    assert [_make("jpeg", strength=s).quality for s in (0.0, 0.5, 1.0)] == [90, 50, 10]
    psnr = {q: _psnr(_make("jpeg", quality=q).apply(images, _gen()), images) for q in (10, 50, 90)}
    assert psnr[10] < psnr[50] < psnr[90]
    assert psnr[90] > 30.0


def test_gaussian_noise_empirical_std_on_mid_grey():
    grey = torch.full((4, 3, 64, 64), 0.5)
    for std in (0.02, 0.05, 0.1):
        out = _make("gaussian_noise", std=std).apply(grey, _gen(3))
        diff = out - grey
        assert abs(float(diff.std()) - std) < 0.03 * std
        assert abs(float(diff.mean())) < 0.02 * std
    assert math.isclose(_make("gaussian_noise", strength=1.0).std, 0.1)


def test_brightness_is_clamped_scaling():
    dark = _natural_images(seed=5) * 0.3
    out = _make("brightness", factor=1.7).apply(dark, _gen())
    assert torch.allclose(out, dark * 1.7, atol=1e-6)
    bright = 0.6 + 0.4 * _natural_images(seed=6)
    assert torch.equal(_make("brightness", factor=2.0).apply(bright, _gen()), torch.ones_like(bright))
    assert [_make("brightness", strength=s).factor for s in (0.0, 1.0)] == [1.0, 2.0]


@pytest.mark.parametrize("name,factor", [("brightness", 1.6), ("contrast", 1.8), ("contrast", 0.4),
                                         ("saturation", 0.3), ("saturation", 1.7)])
def test_color_matches_torchvision(name, factor, images):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    ref_fn = {"brightness": tvf.adjust_brightness, "contrast": tvf.adjust_contrast,
              "saturation": tvf.adjust_saturation}[name]
    out = _make(name, factor=factor).apply(images, _gen())
    ref = torch.stack([ref_fn(img, factor) for img in images])
    assert torch.allclose(out, ref, atol=1e-5)


def test_saturation_zero_is_greyscale(images):
    out = _make("saturation", strength=1.0).apply(images, _gen())
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    luma = 0.2989 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(out[:, 0], luma, atol=1e-5)


def test_contrast_keeps_mean_luma_without_clipping():
    x = 0.4 + 0.2 * _natural_images(seed=8)  # values in [0.4, 0.6]: factor 2 cannot clip
    out = _make("contrast", factor=2.0).apply(x, _gen())

    def luma_mean(t):
        return (0.2989 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).mean(dim=(1, 2))

    m = luma_mean(x).view(-1, 1, 1, 1)
    assert torch.allclose(out, 2.0 * x - m, atol=1e-5)  # factor * x + (1 - factor) * mean luma
    assert torch.allclose(luma_mean(out), luma_mean(x), atol=1e-3)  # (BT.601 weights sum to 0.9999)
    assert torch.allclose(out - out.mean(dim=(1, 2, 3), keepdim=True),
                          2 * (x - x.mean(dim=(1, 2, 3), keepdim=True)), atol=1e-5)


def test_crop_center_full_scale_is_identity(images):
    assert torch.equal(_make("crop", scale=1.0, mode="center").apply(images, _gen()), images)
    assert torch.equal(_make("crop", scale=1.0, mode="random").apply(images, _gen()), images)


def test_crop_center_zooms_into_the_middle():
    size = 64
    ramp = (torch.arange(size, dtype=torch.float32) / (size - 1)).view(1, 1, 1, size).expand(1, 3, size, size)
    out = _make("crop", scale=0.25, mode="center").apply(ramp.contiguous(), _gen())  # window: columns 16..47
    row = out[0, 0, size // 2]
    assert torch.all(row[1:] >= row[:-1] - 1e-6)
    assert abs(float(row[0]) - 16 / 63) < 0.01 and abs(float(row[-1]) - 47 / 63) < 0.01
    # the window is centred: the output's mean equals the ramp's mean
    assert abs(float(out.mean()) - 0.5) < 1e-4


def test_crop_random_window_lies_inside_the_image():
    size = 32
    ramp = (torch.arange(size, dtype=torch.float32) / (size - 1)).view(1, 1, 1, size).expand(8, 3, size, size)
    out = _make("crop", scale=0.25, mode="random").apply(ramp.contiguous(), _gen(4))
    starts = out[:, 0, 0, 0]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert len({round(float(v), 4) for v in starts}) > 1  # offsets differ between images
    assert torch.all(out[:, 0, 0, -1] - starts > 0.4)  # each output spans about half of the ramp


def test_median_filter_removes_isolated_outliers():
    grey = torch.full((2, 3, 32, 32), 0.5)
    corrupted = grey.clone()
    corrupted[:, :, 2:30:5, 3:30:5] = 1.0  # isolated salt, spaced 5 px apart
    corrupted[:, :, 4:30:5, 1:30:5] = 0.0  # isolated pepper
    assert _mad(corrupted, grey) > 0.01
    out = _make("median_filter", kernel_size=3).apply(corrupted, _gen())
    assert torch.equal(out, grey)
    noisy = _make("salt_pepper", amount=0.03).apply(grey, _gen(2))
    restored = _make("median_filter", kernel_size=3).apply(noisy, _gen())
    assert float((restored == 0.5).float().mean()) > 0.99
    assert [_make("median_filter", strength=s).kernel_size for s in STRENGTHS] == [1, 3, 5, 7, 9]


def test_salt_pepper_hits_the_requested_fraction():
    grey = torch.full((4, 3, 64, 64), 0.5)
    out = _make("salt_pepper", amount=0.1).apply(grey, _gen(8))
    salt = (out == 1.0).all(dim=1)
    pepper = (out == 0.0).all(dim=1)
    changed = (out != 0.5).any(dim=1)
    assert torch.equal(changed, salt | pepper)  # a hit pixel changes in all channels at once
    assert abs(float(changed.float().mean()) - 0.1) < 0.01
    assert abs(float(salt.float().mean()) - 0.05) < 0.008 and abs(float(pepper.float().mean()) - 0.05) < 0.008


def test_gaussian_blur_matches_torchvision(images):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    for k, sigma in ((3, 0.8), (7, 2.0), (11, None)):
        params = {"kernel_size": k} if sigma is None else {"kernel_size": k, "sigma": sigma}
        out = _make("gaussian_blur", **params).apply(images, _gen())
        ref = tvf.gaussian_blur(images, [k, k], None if sigma is None else [sigma, sigma])
        assert torch.allclose(out, ref, atol=1e-5)


def test_gaussian_blur_strength_mapping_and_constant_image():
    assert [_make("gaussian_blur", strength=s).kernel_size for s in STRENGTHS] == [1, 5, 11, 15, 21]
    assert _make("gaussian_blur", strength=1.0).sigma == pytest.approx(3.5)
    const = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(_make("gaussian_blur", strength=1.0).apply(const, _gen()), const, atol=1e-6)


@pytest.mark.parametrize("name", ("gaussian_blur", "median_filter"))
def test_even_kernel_refused(name):
    with pytest.raises(ConfigError, match="odd"):
        _make(name, kernel_size=4)


def test_resize_constant_and_identity(images):
    const = torch.full((1, 3, 40, 40), 0.7)
    for mode in ("bilinear", "bicubic"):
        assert torch.allclose(_make("resize", scale=0.3, mode=mode).apply(const, _gen()), const, atol=1e-5)
    assert torch.equal(_make("resize", scale=1.0).apply(images, _gen()), images)
    assert [_make("resize", strength=s).scale for s in (0.0, 1.0)] == [1.0, 0.25]


def test_rotation_direction_and_identity(images):
    out = _make("rotation", degrees=90.0).apply(images, _gen())
    assert torch.allclose(out, torch.rot90(images, 1, dims=(2, 3)), atol=1e-5)  # counter-clockwise
    assert torch.equal(_make("rotation", strength=0.0).apply(images, _gen()), images)
    corners = _make("rotation", degrees=45.0).apply(torch.ones(1, 3, 33, 33), _gen())
    assert float(corners[0, :, 0, 0].max()) == 0.0  # black fill where the frame was uncovered
    assert _make("rotation", strength=1.0).degrees == 45.0


def test_sharpen_keeps_flat_areas_and_raises_edge_contrast():
    const = torch.full((1, 3, 24, 24), 0.4)
    assert torch.allclose(_make("sharpen", amount=2.0).apply(const, _gen()), const, atol=1e-6)
    step = torch.full((1, 3, 24, 24), 0.3)
    step[..., 12:] = 0.7
    out = _make("sharpen", amount=1.0).apply(step, _gen())
    assert float(out[0, 0, 5, 11]) < 0.3 and float(out[0, 0, 5, 12]) > 0.7  # overshoot on both sides
    assert torch.allclose(out[..., :8], step[..., :8], atol=1e-4)  # far from the edge: unchanged


def test_combination_applies_members_at_common_strength(images):
    single = _make("combination", members=["brightness"], strength=0.3).apply(images, _gen())
    assert torch.equal(single, _make("brightness", strength=0.3).apply(images, _gen()))

    chained = _make("combination", members=["contrast", "gaussian_noise"], strength=0.6).apply(images, _gen(4))
    g = _gen(4)
    ref = _make("gaussian_noise", strength=0.6).apply(_make("contrast", strength=0.6).apply(images, g), g)
    assert torch.equal(chained, ref)

    by_level = _make("combination", members=["contrast", "gaussian_noise"], level=0.6).apply(images, _gen(4))
    assert torch.equal(by_level, chained)


def test_combination_default_chain_and_member_validation():
    attack = _make("combination")
    assert attack.members == ["crop", "brightness", "contrast", "gaussian_blur", "gaussian_noise", "jpeg"]
    assert attack.level == 0.5
    assert _make("combination", strength=0.2).level == 0.2
    with pytest.raises(ConfigError):
        _make("combination", members=["combination"])
    with pytest.raises(ConfigError):
        _make("combination", members=["no_such_attack"])


def test_identity_ignores_strength(images):
    assert image_attacks.get("none").from_strength(0.9) == {}
    assert torch.equal(_make("none", strength=1.0).apply(images, _gen()), images)
