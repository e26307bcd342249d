"""Adversarial embedding attack (WAVES): a PGD perturbation that moves the image's latent away from its own."""

from __future__ import annotations

from typing import Any

import torch

from markbench import AttackContext, image_attacks, ImageAttack, param
from markbench.latents import to_latent


@image_attacks.register("adv_embedding")
class AdvEmbedding(ImageAttack):
    """Adversarial embedding attack: L-infinity PGD pushing the image's VAE-encoder latent away from the original.

    WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "AdvEmbG-KLVAE8":
    maximise ``|| E(x + delta) - E(x) ||^2`` over ``||delta||_inf <= eps`` with projected gradient ascent (Madry et
    al., ICLR 2018), where E is an encoder the attacker has. Grey-box here: ``E`` is the base pipeline's own VAE
    encoder (``needs_model = "base"``; posterior mean in the scaled latent space, :func:`bench.latents.to_latent`),
    the encoder a latent watermark is read through.

    PGD: a uniform random start in the eps-ball (from the stage's generator), ``steps`` signed-gradient steps of
    size ``step_size * eps``, each followed by projection onto the eps-ball and [0, 1]. The result is rounded to the
    8-bit grid *toward the input* (``x + trunc(255 delta) / 255``), so the L-infinity bound holds exactly on what is
    stored. The number of steps and the step size are this implementation's (Madry et al.'s rule of a total path of
    about 2.5 eps); the eps range is WAVES'.

    Strength mapping (WAVES' budget range 2/255 to 8/255): ``eps = (2 + 6 s) / 255``; default (s = 0.5) 5/255.
    """

    version = "1"
    needs_model = "base"
    strength_mapping = "eps = (2 + 6 s) / 255"
    zero_strength_tolerance = 2.0 / 255
    smoke_params = {"steps": 3}
    eps: float = param(5.0 / 255, "L-infinity budget (image range [0, 1])", low=0.0, high=1.0)
    steps: int = param(50, "PGD iterations", low=1, high=10000)
    step_size: float = param(0.05, "each step's size as a fraction of eps", low=0.0, high=1.0)
    random_start: bool = param(True, "start from a uniform random point of the eps-ball")
    batch_size: int = param(16, "images attacked at once", low=1, high=1024)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"eps": (2.0 + 6.0 * s) / 255.0}

    def apply(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext) -> torch.Tensor:
        vae = ctx.model.vae
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i:i + self.batch_size]
            out.append(self.perturb(vae, x, generator, ctx.device))
        return torch.cat(out)

    def perturb(self, vae: Any, x: torch.Tensor, generator: torch.Generator, device: str) -> torch.Tensor:
        """The PGD perturbation of one batch, quantised toward the input; ``||out - x||_inf <= eps`` exactly."""
        dtype = next(vae.parameters()).dtype
        eps = self.eps
        x_dev = x.to(device, torch.float32)
        with torch.no_grad():
            z0 = to_latent(vae, x_dev.to(dtype))[0].float()
        if self.random_start:
            delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
        else:
            delta = torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).to(device, torch.float32)
        alpha = self.step_size * eps
        with torch.enable_grad():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                z = to_latent(vae, (x_dev + delta).to(dtype))[0].float()
                loss = ((z - z0) ** 2).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
                    delta = (x_dev + delta).clamp(0, 1) - x_dev
        delta = delta.detach().cpu()
        # onto the 8-bit grid, toward the input: never outside the budget, and unchanged by the harness's rounding
        # when the input is on the grid (as stored images are)
        delta = torch.trunc(delta * 255.0) / 255.0
        return (x + delta).clamp(0.0, 1.0)
