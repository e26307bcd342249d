"""Sharpening by unsharp masking."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from markbench import image_attacks, ImageAttack, param


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with kernel side ``2 * ceil(3 sigma) + 1`` and reflect padding."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    size = 2 * radius + 1
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = (k1 / k1.sum()).to(x.dtype)
    c, h, w = x.shape[1:]
    mode = "reflect" if radius < h and radius < w else "replicate"
    y = F.pad(x, (radius, radius, radius, radius), mode=mode)
    y = F.conv2d(y, k1.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
    return F.conv2d(y, k1.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)


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
        detail = x - _gaussian_blur(x, self.sigma)
        return (x + amount * detail).clamp(0.0, 1.0).contiguous()
