"""How far adv_embedding moves the base VAE latent at its budget, against a random +-eps sign pattern of the same
L-infinity size (the setting of tests/test_removal_attacks.py: 3 sample images at 48 px, tiny-sd, 20 PGD steps).

    python -m experiments.adv_embedding_shift
"""

from __future__ import annotations

import torch


def main() -> None:
    from markbench import image_attacks
    from markbench.config import ModelConfig
    from markbench.latents import to_latent
    from markbench.models import load_pipeline
    from markbench.testing import run_attack, sample_images

    pipe = load_pipeline(ModelConfig(builtin="tiny-sd"))
    x = sample_images(3, 48)

    def shift(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((to_latent(pipe.vae, a)[0] - to_latent(pipe.vae, b)[0]) ** 2).mean().sqrt())

    with torch.no_grad():
        zstd = float(to_latent(pipe.vae, x)[0].std())
    for s in (0.0, 1.0):
        attack = image_attacks.get("adv_embedding")(strength=s, steps=20)
        out = run_attack(attack, x, torch.Generator().manual_seed(3), pipe)
        sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(8)).float() * 2 - 1
        rand = (x + attack.eps * sign).clamp(0, 1)
        print(f"eps {attack.eps * 255:.0f}/255: L-inf {float((out - x).abs().max()) * 255:.3f}/255, latent RMS shift "
              f"{shift(out, x):.4f} vs random sign {shift(rand, x):.4f} (latent std {zstd:.3f})")


if __name__ == "__main__":
    main()
