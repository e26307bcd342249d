"""Which part of the initial noise comes back through the tiny VAE, per latent channel and Fourier radius (issue 28).

Tree-Ring writes its key into a disc of one channel's centred FFT. The decomposition in docs/tree_ring.md
(``experiments/inversion_decomposition.py``) measured the paper's channel 3 only; this probe splits what the verifier
recovers by channel and by the key's radius, on the tiny configs' path: N seeded initial latents ``z`` (the
harness's ``initial_latents``), prompts from ``tiny:heldout``, tiny-sd-rt at guidance 1 (20 DDIM steps) to the final
latent ``z_0``; then decode to 8 bits, encode (posterior mean), optionally refine by decoder inversion
(:func:`markbench.inversion.decoder_invert`, the verifier's own), and DDIM-invert with the empty prompt over 20 steps.

Per channel it prints: (a) the relative error of the VAE round trip of ``z_0`` in that channel (with the decoder
inversion, when asked), the correlation of the recovered ``z_hat`` with ``z`` over the channel's elements, and for
each radius the correlation of the Fourier coefficients on the disc (the key's region: what the L1 score compares
with the key).

    OMP_NUM_THREADS=1 nice -n 10 python -m experiments.tree_ring_channels --n 16 --decoder-inversion 0 200
"""

from __future__ import annotations

import argparse

import torch

from markbench import inversion as inv
from markbench.config import ModelConfig
from markbench.generation import initial_latents
from markbench.models import load_pipeline
from markbench.world import load_prompt_set


def disc(h: int, w: int, radius: float) -> torch.Tensor:
    y = torch.arange(h, dtype=torch.float64) - h // 2
    x = torch.arange(w, dtype=torch.float64) - w // 2
    return (y[:, None] ** 2 + x[None, :] ** 2) <= radius ** 2


def disc_correlation(zh: torch.Tensor, z: torch.Tensor, channel: int, radius: float) -> float:
    """Normalised inner product of the centred Fourier coefficients of ``zh`` and ``z`` on one channel's disc."""
    m = disc(z.shape[-2], z.shape[-1], radius)
    fh = torch.fft.fftshift(torch.fft.fft2(zh[:, channel].double()), dim=(-2, -1))[:, m]
    f = torch.fft.fftshift(torch.fft.fft2(z[:, channel].double()), dim=(-2, -1))[:, m]
    return float((fh * f.conj()).sum().real / (fh.abs().norm() * f.abs().norm()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="sampler and inversion steps")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--model", default="tiny-sd-rt")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (the tiny world's 64, or larger)")
    ap.add_argument("--radii", type=float, nargs="+", default=[1.5, 2.5, 4.0, 6.0])
    ap.add_argument("--decoder-inversion", type=int, nargs="+", default=[0, 200],
                    help="Adam steps of decoder inversion (lr 0.05, cosine), one row group per value")
    args = ap.parse_args(argv)
    pipe = load_pipeline(ModelConfig(builtin=args.model))
    prompts = load_prompt_set("tiny:heldout")[:args.n]
    z = initial_latents(pipe, range(args.n), args.size, args.size)
    with torch.no_grad():
        z0 = pipe(prompt=list(prompts), height=args.size, width=args.size, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, latents=z.clone(), output_type="latent").images.float()
        images = (inv.decode(pipe, z0) * 255).round() / 255
        enc = inv.encode(pipe, images)
    print(f"N = {args.n}, {args.model} at guidance {args.guidance:g}, {args.steps} DDIM steps; "
          f"{args.size} px; recovered z_hat against the true initial noise z, per channel")
    head = ["decoder inversion", "channel", "(a) round-trip rel. error of z_0", "corr(z_hat, z)"] + \
        [f"disc r {r:g}" for r in args.radii]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for k in args.decoder_inversion:
        zr = inv.decoder_invert(pipe, images, enc, steps=k) if k else enc
        zh = inv.invert_latents(pipe, zr, args.steps)
        for c in range(z.shape[1]):
            rel = float((zr[:, c] - z0[:, c]).norm() / z0[:, c].norm())
            corr = float(torch.corrcoef(torch.stack([zh[:, c].flatten(), z[:, c].flatten()]))[0, 1])
            cells = [f"{disc_correlation(zh, z, c, r):.3f}" for r in args.radii]
            print(f"| {k} | {c} | {rel:.3f} | {corr:.3f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
