"""Additive Gaussian noise."""

from __future__ import annotations

from typing import Any

import torch

from markbench import image_attacks, ImageAttack, param


@image_attacks.register("gaussian_noise")
class GaussianNoise(ImageAttack):
    """Additive i.i.d. Gaussian noise per pixel and channel: ``clamp(x + std * n)``, ``n ~ N(0, 1)``.

    The noise is drawn from the stage generator for the whole batch at once, so every image (and channel) gets
    its own independent draw.

    Strength mapping (WAVES range): ``std = 0.1 * s`` (on the [0, 1] pixel scale; s=0.5 gives the default 0.05).

    Origin: WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "Gaussian
    noise" distortion with std 0-0.1: checked against WAVES' distortion code, which adds ``randn * std`` to the
    image as a [0, 1] tensor and clamps, with ``noise = (0, 0.1)`` as its strength range (the same mapping).
    """

    version = "1"
    strength_mapping = "std = 0.1 s"
    std: float = param(0.05, "noise standard deviation on the [0, 1] pixel scale", low=0.0, high=1.0)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"std": 0.1 * s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        if self.std == 0.0:
            return x.clamp(0.0, 1.0).clone()
        # drawn on the generator's device (the harness's is a CPU generator), then moved to the images'
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x.device).to(x.device)
        return (x + self.std * noise).clamp(0.0, 1.0).contiguous()
