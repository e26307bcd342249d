"""Between images and a latent diffusion model's latent space through its VAE, in the form latent watermarks use.

:func:`to_latent` gives the posterior mean and standard deviation in the *scaled* latent space (what the UNet sees:
``(mean - shift) * scaling_factor``); :func:`from_latent` decodes scaled latents to images, nominally in [0, 1] and
not clamped (as SleeperMark's and AquaLoRA's training code decode). Both honour SD3-style ``shift_factor``.
(:func:`bench.training.encode_images` / :func:`~bench.training.decode_latents` are the pipeline-level forms, with
``no_grad`` encoding and optional sampling; their decode rounds ``(x + 1) / 2`` where this one rounds ``x / 2 + 0.5``,
so the two are kept apart to keep every stored number bit-identical.)
"""

from __future__ import annotations

import torch


def to_latent(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] -> (posterior mean, posterior std) in the diffusion model's (scaled) latent space."""
    dist = vae.encode(images * 2 - 1).latent_dist
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (dist.mean - shift) * scale, dist.std * scale


def from_latent(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (nominally [0, 1], not clamped, as in the official training code)."""
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / scale + shift).sample / 2 + 0.5
