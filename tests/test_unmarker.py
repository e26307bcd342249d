"""UnMarker (issue 27): its losses against independent references, and the perceptual budget it must keep."""

from __future__ import annotations

import numpy as np
import torch

from markbench.registries import image_attacks
from markbench.testing import sample_images


def test_spectral_distance_is_numpys_mean_absolute_amplitude_difference():
    from markbench.attacks.image.unmarker import spectral_distance

    x, y = sample_images(2, 32, seed=3), sample_images(2, 32, seed=4)
    ref = np.abs(np.abs(np.fft.fft2(x.double().numpy(), norm="ortho"))
                 - np.abs(np.fft.fft2(y.double().numpy(), norm="ortho"))).reshape(2, -1).mean(1)
    assert np.allclose(spectral_distance(x, y).numpy(), ref, rtol=1e-4)


def test_low_frequency_distance_is_scipys_mirrored_box_filter_difference():
    from scipy.ndimage import uniform_filter

    from markbench.attacks.image.unmarker import low_frequency_distance

    x, y = sample_images(2, 32, seed=5), sample_images(2, 32, seed=6)
    f = lambda a: uniform_filter(a.double().numpy(), size=(1, 1, 5, 5), mode="mirror")  # noqa: E731
    ref = ((f(x) - f(y)) ** 2).reshape(2, -1).mean(1)
    assert np.allclose(low_frequency_distance(x, y, 5).numpy(), ref, rtol=1e-4)


def test_unmarker_keeps_the_ssim_budget_measured_by_kornia_and_spends_it():
    """1 - SSIM (kornia's independent SSIM, same window) stays within the stage-2 budget; the image does change,
    more at strength 1 than at 0, and the change reaches the amplitude spectrum."""
    import kornia

    x = sample_images(4, 48, seed=8)
    outs = {}
    for s in (0.0, 1.0):
        a = image_attacks.get("unmarker")(strength=s, stage1_steps=40, stage2_steps=10, stage1_lr=0.002)
        y = a.apply(x, torch.Generator().manual_seed(0))
        dssim = 1 - kornia.metrics.ssim(y, x, 11, max_val=1.0).flatten(1).mean(1)
        assert float(dssim.max()) <= a.stage2_budget + 2e-3, (s, dssim)
        outs[s] = y
    mad = {s: float((y - x).abs().mean()) for s, y in outs.items()}
    assert 0 < mad[0.0] < mad[1.0]
    from markbench.attacks.image.unmarker import spectral_distance

    assert float(spectral_distance(outs[1.0], x).mean()) > 2 * float(spectral_distance(outs[0.0], x).mean()) > 0


def test_unmarker_records_a_model_free_cost():
    from markbench import AttackContext

    ctx = AttackContext()
    image_attacks.get("unmarker")(stage1_steps=3, stage2_steps=2).apply(sample_images(2, 32), torch.Generator(), ctx)
    assert ctx.costs == {"model_evals": 0, "steps": 5, "attacker_images": 0}
