"""Tree-Ring (defenses/tree_ring.py): the key, its injection and the detection statistics on known latents."""

from __future__ import annotations

import pytest
import torch

from markbench.stats import roc_auc
from markbench.defenses.tree_ring import TreeRing, circle_mask, fft_latent, inject, l1_distance, make_key, p_values


def _key(shape=(4, 16, 16), channel=3, radius=2.5, pattern="rings", seed=0):
    return make_key(shape, channel, radius, pattern, torch.Generator().manual_seed(seed))


def test_the_mask_is_the_disc_of_the_radius_in_one_channel_only():
    key, mask = _key()
    assert mask[3].sum() == circle_mask(16, 16, 2.5).sum() == 21  # 1 + 4 + 4 + 4 + 8 lattice points, |f| <= 2.5
    assert not mask[:3].any()
    y, x = torch.nonzero(mask[3], as_tuple=True)
    assert ((y - 8) ** 2 + (x - 8) ** 2).max() <= 2.5 ** 2


def test_rings_pattern_is_constant_on_each_ring_and_differs_between_rings():
    key, mask = _key(shape=(4, 32, 32), radius=6)
    yy, xx = torch.meshgrid(torch.arange(32) - 16, torch.arange(32) - 16, indexing="ij")
    dist = (yy ** 2 + xx ** 2).double().sqrt()
    values = []
    for r in range(1, 7):
        ring = (dist > r - 1) & (dist <= r)
        ring_values = key[3][ring]
        assert torch.allclose(ring_values, ring_values[0].expand_as(ring_values))
        values.append(ring_values[0])
    assert len({(round(v.real.item(), 6), round(v.imag.item(), 6)) for v in values}) == 6


def test_the_paper_settings_are_the_defaults():
    d = TreeRing()
    assert (d.radius, d.channel, d.pattern, d.score) == (10.0, 3, "rings", "l1")


@pytest.mark.parametrize("bad, match", [(dict(channel=4), "channel 4"), (dict(radius=8.0), "radius")])
def test_a_key_that_does_not_fit_the_latent_is_refused(bad, match):
    args = dict(shape=(4, 16, 16), channel=3, radius=2.5, pattern="rings", generator=torch.Generator())
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        make_key(**args)


def test_injection_writes_the_key_and_leaves_the_rest_of_the_spectrum():
    key, mask = _key()
    z = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    zw = inject(z, key, mask)
    f, fw = fft_latent(z), fft_latent(zw)
    assert torch.allclose(fw[:, ~mask], f[:, ~mask], atol=1e-5)  # outside the disc: the seed's own noise
    # inside: the real part of the key (the inverse FFT's imaginary part is dropped, as in the official code)
    assert torch.allclose(fw[:, mask].real, key[mask].real.expand(8, -1).to(fw.real.dtype), atol=1e-4)


@pytest.mark.parametrize("score", ["l1", "pvalue"])
def test_with_a_perfect_inversion_every_marked_latent_outscores_every_clean_one(score):
    key, mask = _key(seed=3)
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(64, 4, 16, 16, generator=g)
    marked = inject(torch.randn(64, 4, 16, 16, generator=g), key, mask)
    if score == "l1":
        pos, neg = -l1_distance(marked, key, mask), -l1_distance(clean, key, mask)
    else:
        pos, neg = -torch.log10(p_values(marked, key, mask)), -torch.log10(p_values(clean, key, mask))
    assert roc_auc(pos.numpy(), neg.numpy()).value == 1.0


def test_p_values_of_marked_latents_are_tiny_and_of_clean_latents_are_not():
    key, mask = _key(shape=(4, 64, 64), radius=10, seed=4)
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(32, 4, 64, 64, generator=g)
    marked = inject(torch.randn(32, 4, 64, 64, generator=g), key, mask)
    assert p_values(marked, key, mask).max() < 1e-6
    assert p_values(clean, key, mask).median() > 1e-3
