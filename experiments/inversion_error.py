"""How well the shared DDIM inversion (bench.inversion) recovers the initial noise, on a given model.

Prints, for N seeded standard-normal initial latents z:

* latent level (no VAE): sample z -> z_0 with the deterministic DDIM sampler (empty prompt, guidance 1), invert
  z_0 with plain DDIM and with the exact (fixed-point) inversion; relative error ||z_hat - z|| / ||z||;
* image level (the verifier's view): the pipeline generates the image from z with a prompt at the run's guidance,
  the image is quantised to 8 bits, encoded (VAE posterior mean) and inverted with the empty prompt at guidance 1;
  the correlation of z_hat with z, the fraction of matching signs (Gaussian Shading's raw bits) and the relative
  error of the low-frequency block of the centred FFT (where Tree-Ring's key lives).

The reference measured in the same run is z itself: a correlation of 0 and a sign agreement of 0.5 are what an
inversion that recovers nothing gives.

    python experiments/inversion_error.py --model tiny-sd --n 4 --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch

from markbench import inversion as inv
from markbench.config import ModelConfig
from markbench.generation import generate_images
from markbench.models import load_pipeline
from markbench.plugins import GenerationRequest


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def low_frequency_error(a: torch.Tensor, b: torch.Tensor, radius: int = 3) -> float:
    fa = torch.fft.fftshift(torch.fft.fft2(a.double()), dim=(-2, -1))
    fb = torch.fft.fftshift(torch.fft.fft2(b.double()), dim=(-2, -1))
    h, w = a.shape[-2:]
    sl = (..., slice(h // 2 - radius, h // 2 + radius + 1), slice(w // 2 - radius, w // 2 + radius + 1))
    return float((fa - fb)[sl].abs().norm() / fb[sl].abs().norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-sd", help="builtin model (tiny-sd, tiny-sd-rt, micro-sd)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--iters", type=int, default=3, help="fixed-point iterations of the exact inversion")
    ap.add_argument("--prompt", default="a red circle on a blue background")
    args = ap.parse_args(argv)
    pipe = load_pipeline(ModelConfig(builtin=args.model))
    shape = inv.latent_shape(pipe, args.size, args.size)
    z = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(0))
    print(f"{args.model}: latent {shape}, N={args.n}, {args.steps} steps")
    z0 = inv.sample_latents(pipe, z, args.steps)
    for method in ("ddim", "exact"):
        t = time.perf_counter()
        zt = inv.invert_latents(pipe, z0, args.steps, method=method, fixed_point_iters=args.iters)
        print(f"latent level, {method:5s}: relative error {inv.relative_error(zt, z):.3f} "
              f"({time.perf_counter() - t:.1f} s)")
    request = GenerationRequest(prompts=(args.prompt,) * args.n, seeds=tuple(range(args.n)), height=args.size,
                                width=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                batch_size=args.n)
    images = (generate_images(pipe, request, latents=z) * 255).round() / 255
    z0_img = inv.encode(pipe, images)
    with torch.no_grad():
        z0_direct = pipe(prompt=list(request.prompts), height=args.size, width=args.size,
                         num_inference_steps=args.steps, guidance_scale=args.guidance, latents=z.clone(),
                         output_type="latent").images.float()
    print(f"VAE round trip of the generated latents: relative error {inv.relative_error(z0_img, z0_direct):.3f}")
    for method in ("ddim", "exact"):
        zt = inv.invert_latents(pipe, z0_img, args.steps, method=method, fixed_point_iters=args.iters)
        print(f"image level (prompt, guidance {args.guidance:g}), {method:5s}: correlation {correlation(zt, z):.3f}, "
              f"signs {float((zt > 0).eq(z > 0).float().mean()):.3f}, low-frequency error "
              f"{low_frequency_error(zt, z):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
