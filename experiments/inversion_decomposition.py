"""Where does the tiny world lose the initial noise? The inversion error of bench.inversion, decomposed (issue 28).

For N seeded initial latents ``z`` (the harness's ``initial_latents``; prompts from ``tiny:heldout``) the pipeline
samples the final latent ``z_0`` (20 DDIM steps, a given guidance), and the verifier's path is split into its parts:

* (a) the VAE round trip alone: ``z_0 -> decode -> 8-bit -> encode (posterior mean)``, relative error against
  ``z_0``, for tiny-sd's VAE and for tiny-sd-rt's round-trip-trained decoder (the same encoder, UNet and latents);
* (b) the inversion alone: the exact final latent ``z_0`` (no VAE) inverted with the empty prompt at guidance 1, by
  DDIM over 20 or 50 steps and by the exact (fixed-point) inversion;
* (c) both: the decoded 8-bit image encoded and inverted.

Against the true ``z`` each recovered ``z_hat`` gets: the relative error ``||z_hat - z|| / ||z||``, the correlation,
the fraction of matching signs (Gaussian Shading's raw bits), the bit accuracy after Gaussian Shading's majority vote
over 16 copies (hw_copies = 4 on a 16x16 latent: as if ``z`` were marked noise), and on Tree-Ring's key region
(channel 3, the disc of radius 2.5 in the centred FFT) the relative error and the correlation of the Fourier
coefficients.

``--decoder-inversion K`` adds rows where the encoded latent is refined by ``K`` Adam steps (lr 0.05) on
``|Dec(z) - x|^2`` (the decoder inversion of Hong et al., arXiv 2311.18387) before the latent is inverted.

    OMP_NUM_THREADS=1 nice -n 10 python -m experiments.inversion_decomposition --n 16 --guidance 7.5 1
"""

from __future__ import annotations

import argparse
import time

import torch

from markbench import inversion as inv
from markbench.config import ModelConfig
from markbench.generation import initial_latents
from markbench.models import load_pipeline
from markbench.world import load_prompt_set


def ring_mask(h: int, w: int, radius: float) -> torch.Tensor:
    y = torch.arange(h, dtype=torch.float64) - h // 2
    x = torch.arange(w, dtype=torch.float64) - w // 2
    return (y[:, None] ** 2 + x[None, :] ** 2) <= radius ** 2


def spectrum(z: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(z.double()), dim=(-2, -1))


def measures(zh: torch.Tensor, z: torch.Tensor, *, channel: int = 3, radius: float = 2.5, hw_copies: int = 4
             ) -> dict[str, float]:
    zh, z = zh.double(), z.double()
    c, h, w = z.shape[1:]
    corr = float(torch.corrcoef(torch.stack([zh.flatten(), z.flatten()]))[0, 1])
    agree = (zh > 0) == (z > 0)
    n = z.shape[0]
    copies = agree.float().reshape(n, c, hw_copies, h // hw_copies, hw_copies, w // hw_copies).mean(dim=(2, 4))
    bit_acc = float(torch.where(copies == 0.5, 0.5, (copies > 0.5).double()).mean())
    m = ring_mask(h, w, radius)
    fh, f = spectrum(zh)[:, channel][:, m], spectrum(z)[:, channel][:, m]
    ring_err = float((fh - f).abs().norm() / f.abs().norm())
    ring_corr = float((fh * f.conj()).sum().real / (fh.abs().norm() * f.abs().norm()))
    return {"rel_err": inv.relative_error(zh, z), "corr": corr, "signs": float(agree.double().mean()),
            "gs_bits": bit_acc, "ring_err": ring_err, "ring_corr": ring_corr}


@torch.no_grad()
def final_latents(pipe, prompts, z, steps: int, guidance: float) -> torch.Tensor:
    if guidance == 0:  # the inversion's own forward map: empty prompt, guidance 1
        return inv.sample_latents(pipe, z, steps)
    return pipe(prompt=list(prompts), height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                latents=z.clone(), output_type="latent").images.float()


def round_trip(pipe, z0: torch.Tensor, decoder_inversion: int = 0, lr: float = 0.05) -> torch.Tensor:
    """Decode to 8 bits and encode (posterior mean); then ``decoder_inversion`` Adam steps on |Dec(z) - x|^2."""
    images = (inv.decode(pipe, z0) * 255).round() / 255
    z = inv.encode(pipe, images)
    if not decoder_inversion:
        return z
    scale = float(pipe.vae.config.scaling_factor)
    pipe.vae.requires_grad_(False)
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    target = images * 2 - 1
    for _ in range(decoder_inversion):
        opt.zero_grad()
        ((pipe.vae.decode(z / scale).sample - target) ** 2).mean().backward()
        opt.step()
    return z.detach()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--guidance", type=float, nargs="+", default=[7.5, 1.0],
                    help="generation guidance scales (0: empty prompt at guidance 1, the inversion's own map)")
    ap.add_argument("--inversions", nargs="+", default=["ddim:20", "ddim:50", "exact:20", "exact:50"],
                    help="method:steps[:iters]")
    ap.add_argument("--decoder-inversion", type=int, default=0, help="Adam steps of decoder inversion (0: none)")
    args = ap.parse_args(argv)
    sd = load_pipeline(ModelConfig(builtin="tiny-sd"))
    rt = load_pipeline(ModelConfig(builtin="tiny-sd-rt"))
    prompts = load_prompt_set("tiny:heldout")[:args.n]
    z = initial_latents(sd, range(args.n), 64, 64)
    print(f"N = {args.n} latents {tuple(z.shape[1:])}, {args.steps} sampler steps; rows: recovered z_hat vs true z")
    head = ("generation", "VAE", "inversion", "rel_err", "corr", "signs", "gs_bits", "ring_err", "ring_corr")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for g in args.guidance:
        z0 = final_latents(sd, prompts, z, args.steps, g)
        gen = "empty prompt, g 1" if g == 0 else f"prompt, g {g:g}"
        inputs = {"none": z0}
        for name, pipe in (("tiny-sd", sd), ("tiny-sd-rt", rt)):
            inputs[name] = round_trip(pipe, z0)
            print(f"| {gen} | {name} | (a) VAE round trip of z_0: rel_err {inv.relative_error(inputs[name], z0):.3f}"
                  f" | | | | | | |")
            if args.decoder_inversion:
                label = f"{name} + decoder inversion {args.decoder_inversion}"
                inputs[label] = round_trip(pipe, z0, args.decoder_inversion)
                print(f"| {gen} | {label} | (a) rel_err {inv.relative_error(inputs[label], z0):.3f} | | | | | | |")
        for vae, z0v in inputs.items():
            for spec in args.inversions:
                method, steps, *rest = spec.split(":")
                iters = int(rest[0]) if rest else 3
                t = time.perf_counter()
                zh = inv.invert_latents(sd, z0v, int(steps), method=method, fixed_point_iters=iters)
                m = measures(zh, z)
                label = f"{method} {steps}" + (f" ({iters} it)" if method == "exact" else "")
                print(f"| {gen} | {vae} | {label} | " + " | ".join(f"{v:.3f}" for v in m.values())
                      + f" |  <!-- {time.perf_counter() - t:.1f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
