"""Sharpening by unsharp masking."""

from __future__ import annotations

from typing import Any

import torch

from markbench import image_attacks, ImageAttack, param
from markbench.noise import gaussian_blur_sigma


@image_attacks.register("sharpen")
class Sharpen(ImageAttack):
    """Unsharp-mask sharpening: ``clamp(x + amount * (x - gaussian_blur(x, sigma)))``.

    The blur uses a kernel of side ``2 * ceil(3 sigma) + 1`` with reflect padding; ``amount = 0`` is the identity.

    Strength mapping: ``amount = 2 * s`` (0 = unchanged up to 2 = strong halos; s=0.5 gives the default 1.0), sigma
    kept at its value (default 1 pixel). Not in WAVES; the sharpening filter of StirMark-style benchmarks
    (Petitcolas et al., 1998) and of common image editors.
    """

    version = "1"
    strength_mapping = "amount = 2 s"
    deterministic = True
    amount: float = param(1.0, "weight of the high-pass detail added back (0 = unchanged)", low=0.0, high=10.0)
    sigma: float = param(1.0, "standard deviation of the blur that defines the detail, in pixels", low=0.1, high=20.0)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"amount": 2.0 * s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        amount = self.amount
        if amount == 0.0:
            return x.clamp(0.0, 1.0).clone()
        detail = x - gaussian_blur_sigma(x, self.sigma)
        return (x + amount * detail).clamp(0.0, 1.0).contiguous()
