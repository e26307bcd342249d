"""Where in a VAE's latent space can a watermark live? Jacobian spectra of the decoder and of the round trip.

Latent-residual watermarks (SleeperMark's stage 1, AquaLoRA's latent secret encoder, Tree-Ring, Gaussian Shading) add
a pattern ``delta`` to a latent ``z`` and read it back from ``Enc(Dec(z + delta))``. To first order what comes back is
``J_rt delta`` with ``J_rt`` the Jacobian of ``z -> Enc(Dec(z))`` (posterior mean, scaled latents), and what the image
shows of it is ``J_dec delta``. Their singular values say how many independent latent directions survive the round
trip and how much each costs in pixels:

* ``round_trip``: singular values of ``J_rt`` (1 = the direction comes back whole, 0 = a blind direction the decoder
  ignores or the encoder cannot recover);
* ``decoder_rms``: singular values of ``J_dec`` divided by sqrt(#pixels), the image's RMS change (in [0, 1] units) per
  unit step along the direction; one 8-bit level is 1/255 = 0.0039.

Both are computed by central differences along an orthonormal basis of the latent space (all of it when it has at most
``max_directions`` dimensions, otherwise a random orthonormal subset, whose spectrum under-reads the top of the full
one), batched, in float32, at each latent of ``latents``; the singular values are averaged over the latents.

``python -m experiments.geometry [MODEL]`` prints the table for a pipeline folder or a built-in name (default
``tiny-sd``), at latents of held-out tiny-world images (or Gaussian latents with ``--random``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from markbench.training import decode_latents, encode_images

#: round-trip gains reported as counts ("how many directions keep at least this share of a residual")
GAIN_LEVELS = (0.9, 0.5, 0.2, 0.1)


def jacobians(fn, z: torch.Tensor, basis: torch.Tensor, eps: float = 1e-2, batch: int = 64) -> torch.Tensor:
    """Central-difference Jacobian-vector products ``[out_dim, k]`` of ``fn`` at ``z`` ``[1, ...]`` along the ``k``
    rows of ``basis`` ``[k, z.numel()]``."""
    cols = []
    with torch.no_grad():
        for i in range(0, basis.shape[0], batch):
            b = basis[i:i + batch].to(z)
            step = (eps * b).view(-1, *z.shape[1:])
            plus, minus = fn(z + step), fn(z - step)
            cols.append(((plus - minus) / (2 * eps)).flatten(1).T)
    return torch.cat(cols, 1)


def spectrum(pipe, latents: torch.Tensor, max_directions: int = 4096, eps: float = 1e-2,
             generator: torch.Generator | None = None, batch: int = 64) -> dict[str, Any]:
    """Mean singular values of the round-trip and decoder Jacobians of ``pipe.vae`` at ``latents`` ``[n, C, h, w]``
    (scaled, as the UNet sees them; the round trip reads the encoder's posterior mean)."""
    dim = latents[0].numel()
    if dim <= max_directions:
        basis = torch.eye(dim)
    else:
        q, _ = torch.linalg.qr(torch.randn(dim, max_directions, generator=generator))
        basis = q.T.contiguous()
    k = basis.shape[0]
    rt_sum = torch.zeros(k, dtype=torch.float64)
    dec_sum = torch.zeros(k, dtype=torch.float64)
    pixels = None
    for z in latents:
        z = z[None].float()
        j_dec = jacobians(lambda x: decode_latents(pipe, x), z, basis, eps, batch)
        j_rt = jacobians(lambda x: encode_images(pipe, decode_latents(pipe, x)), z, basis, eps, batch)
        pixels = j_dec.shape[0]
        dec_sum += torch.linalg.svdvals(j_dec.double())[:k]
        rt_sum += torch.linalg.svdvals(j_rt.double())[:k]
    n = len(latents)
    rt, dec = rt_sum / n, dec_sum / n / math.sqrt(pixels)
    return {
        "latent_dim": dim, "directions": k, "n_latents": n, "pixels": pixels,
        "round_trip": rt.tolist(), "decoder_rms": dec.tolist(),
        "round_trip_counts": {str(g): int((rt >= g).sum()) for g in GAIN_LEVELS},
    }


def summary_rows(result: dict[str, Any], ranks=(1, 16, 48, 100, 200, 400)) -> list[tuple[int, float, float]]:
    """``(rank, round-trip gain, decoder RMS per unit latent)`` at the given 1-based ranks."""
    rt, dec = result["round_trip"], result["decoder_rms"]
    return [(r, rt[r - 1], dec[r - 1]) for r in ranks if r <= len(rt)]


def main(argv=None) -> int:
    import argparse
    import json

    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(
        prog="python -m experiments.geometry",
        description="Jacobian spectra of a VAE's decoder and round trip: how many latent directions a latent "
                    "watermark can use.",
        epilog="examples:\n  python -m experiments.geometry\n  python -m experiments.geometry path/to/sd-folder --random "
               "--max-directions 1024 --n 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="tiny-sd", help="built-in model name or pipeline folder")
    p.add_argument("--n", type=int, default=4, help="latents to average over (default 4)")
    p.add_argument("--random", action="store_true", help="Gaussian latents instead of encoded held-out images")
    p.add_argument("--max-directions", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from pathlib import Path

    from markbench.models import builtin_folder, load_pipeline_folder

    folder = Path(a.model) if Path(a.model).is_dir() else builtin_folder(a.model)
    pipe = load_pipeline_folder(folder)
    vae = pipe.vae.float().eval()  # spectrum() works on pipe.vae
    g = torch.Generator().manual_seed(a.seed)
    if a.random:
        side = int(pipe.unet.config.sample_size)
        latents = torch.randn(a.n, int(vae.config.latent_channels), side, side, generator=g)
    else:
        from markbench.worlds.tiny import shapes

        images, _, _ = shapes.make_dataset("heldout", a.n, a.seed + 1)
        latents = encode_images(pipe, shapes.to_tensor(images) / 2 + 0.5)
    res = spectrum(pipe, latents, a.max_directions, generator=g)
    res["model"] = a.model
    if a.json:
        print(json.dumps(res))
        return 0
    t = Table(title=f"{a.model}: latent {tuple(latents.shape[1:])} ({res['latent_dim']} dims, {res['directions']} "
                    f"probed), mean over {res['n_latents']} latents")
    for col in ("rank", "round-trip gain", "image RMS per unit latent", "8-bit levels per unit"):
        t.add_column(col, justify="right")
    for r, rt, dec in summary_rows(res):
        t.add_row(str(r), f"{rt:.3f}", f"{dec:.5f}", f"{dec * 255:.2f}")
    c = Console()
    c.print(t)
    c.print("directions keeping at least " + ", ".join(f"{g}: {n}" for g, n in res["round_trip_counts"].items())
            + " of a latent residual through decode -> encode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
