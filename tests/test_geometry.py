"""experiments.geometry: Jacobian spectra of a VAE, checked on a linear stand-in whose spectra numpy computes."""

import types

import numpy as np
import torch

from experiments import geometry


class _LinearVAE(torch.nn.Module):
    """decode: z [n, 2, 3, 3] -> A z as images [n, 3, 4, 4]; encode: x -> B (2x - 1) (so the round trip is B A up to
    the [0, 1] <-> [-1, 1] maps, which cancel); a scaling factor that must cancel too."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float = 0.5):
        super().__init__()
        self.a, self.b = a, b
        self.config = types.SimpleNamespace(scaling_factor=scale, shift_factor=None)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def decode(self, z):
        return types.SimpleNamespace(sample=(z.flatten(1) @ self.a.T).view(-1, 3, 4, 4))

    def encode(self, x):
        mean = (x.flatten(1) @ self.b.T).view(-1, 2, 3, 3)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean))


def _vae(seed=0):
    """A pipeline stand-in holding the linear VAE, and its matrices A (decoder) and B (encoder)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(48, 18, generator=g)
    a[:, 9:] *= 1e-3  # half the latent directions nearly blind in the decoder
    b = torch.randn(18, 48, generator=g) / 7
    return types.SimpleNamespace(vae=_LinearVAE(a, b)), a.double().numpy(), b.double().numpy()


def test_spectra_of_a_linear_vae_match_numpy():
    pipe, a, b = _vae()
    z = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    res = geometry.spectrum(pipe, z)
    # decode(latents / s) / 2 + 0.5 and encode(2x - 1) * s: the Jacobians are A / (2s) and s B (2 A / (2s)) = B A
    s = pipe.vae.config.scaling_factor
    dec_ref = np.linalg.svd(a / (2 * s), compute_uv=False) / np.sqrt(48)
    rt_ref = np.linalg.svd(b @ a, compute_uv=False)
    np.testing.assert_allclose(res["decoder_rms"], dec_ref, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(res["round_trip"], rt_ref, rtol=1e-3, atol=1e-4)  # float32 differences
    assert res["latent_dim"] == 18 and res["directions"] == 18 and res["pixels"] == 48
    for level, count in res["round_trip_counts"].items():
        assert count == int((rt_ref >= float(level)).sum())
    rows = geometry.summary_rows(res, ranks=(1, 9, 10, 40))
    assert [r[0] for r in rows] == [1, 9, 10]  # ranks beyond the dimension are dropped
    assert rows[2][1] < 1e-2 * rows[1][1]  # the blind half shows as a cliff after rank 9


def test_a_random_subset_of_directions_under_reads_the_full_spectrum():
    pipe, a, b = _vae(2)
    z = torch.zeros(1, 2, 3, 3)
    full = geometry.spectrum(pipe, z)["round_trip"]
    part = geometry.spectrum(pipe, z, max_directions=6, generator=torch.Generator().manual_seed(0))
    assert part["directions"] == 6 and len(part["round_trip"]) == 6
    # singular values of J Q (Q with orthonormal columns) interlace: sigma_i(J Q) <= sigma_i(J)
    assert all(p <= f * (1 + 1e-4) for p, f in zip(part["round_trip"], full))
    assert part["round_trip"][0] > 0.1 * full[0]


def test_shipped_round_trip_vae_carries_latent_residuals_that_tiny_sd_drops():
    """tiny-sd-rt is tiny-sd with the stage-3 decoder: the same UNet, text encoder and VAE encoder (so the same
    latent space), and a round trip that keeps residuals tiny-sd's VAE drops. Measured at one held-out latent along 128
    random orthonormal directions (2026-12-02): 5 vs 69 keep at least half of a residual, 25 vs 128 at least 0.2."""
    from markbench.models import builtin_folder, load_pipeline_folder
    from markbench.training import encode_images
    from markbench.worlds.tiny import shapes

    base = load_pipeline_folder(builtin_folder("tiny-sd"))
    rt = load_pipeline_folder(builtin_folder("tiny-sd-rt"))
    for comp in ("unet", "text_encoder"):
        a, b = getattr(base, comp).state_dict(), getattr(rt, comp).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = base.vae.state_dict(), rt.vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(a["post_quant_conv.weight"], b["post_quant_conv.weight"])

    images, _, _ = shapes.make_dataset("heldout", 1, 1)
    z = encode_images(base, shapes.to_tensor(images) / 2 + 0.5)
    assert torch.equal(z, encode_images(rt, shapes.to_tensor(images) / 2 + 0.5))
    counts = {}
    for name, pipe in (("tiny-sd", base), ("tiny-sd-rt", rt)):
        res = geometry.spectrum(pipe, z, max_directions=128, generator=torch.Generator().manual_seed(0))
        counts[name] = res["round_trip_counts"]
    assert counts["tiny-sd"]["0.5"] <= 15 and counts["tiny-sd-rt"]["0.5"] >= 45, counts
    assert counts["tiny-sd-rt"]["0.2"] >= 3 * counts["tiny-sd"]["0.2"], counts


def test_variant_folder_follows_the_package_it_is_made_from(tmp_path, monkeypatch):
    """The tiny-sd-rt folder is links into the shipped artifacts; a folder left by another checkout (same name, links
    elsewhere) is re-pointed instead of trusted."""
    from markbench import models

    monkeypatch.setenv("MARKBENCH_HOME", str(tmp_path / "home"))
    base, other = tmp_path / "base", tmp_path / "other"
    for root in (base, other):
        for comp in ("unet", "vae"):
            (root / comp).mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    (other / "model_index.json").write_text("{}")
    new_vae = tmp_path / "new_vae"
    new_vae.mkdir()
    stale = models.variant_folder(other, {"vae": new_vae}, "variant")
    assert (stale / "unet").resolve() == (other / "unet").resolve()
    folder = models.variant_folder(base, {"vae": new_vae}, "variant")
    assert folder == stale
    expected = {"unet": base / "unet", "vae": new_vae, "model_index.json": base / "model_index.json"}
    assert {e.name: e.resolve() for e in folder.iterdir()} == {k: v.resolve() for k, v in expected.items()}
