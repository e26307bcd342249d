"""Crop and resize back (resized crop)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from markbench import image_attacks, ImageAttack, param


@image_attacks.register("crop")
class Crop(ImageAttack):
    """Resized crop: keep an aspect-preserving window of ``scale`` of the area and resize it to the original size.

    The window is ``round(H * sqrt(scale)) x round(W * sqrt(scale))`` (at least 1 pixel); ``mode="center"``
    centres it, ``mode="random"`` draws its offset uniformly per image from the stage generator. The window is
    resized back with anti-aliased bilinear interpolation. A window equal to the image returns the input.

    Strength mapping (WAVES range): ``scale = 1 - 0.5 * s`` (area kept 1 down to 0.5; s=0.5 gives the default
    0.75).

    Origin: WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "resized
    crop" distortion with scale 1-0.5 at a random position (here the window keeps the image's aspect ratio).
    """

    version = "1"
    strength_mapping = "scale = 1 - 0.5 s"
    scale: float = param(0.75, "fraction of the image area kept", low=0.1, high=1.0)
    mode: str = param("random", "where the window sits", choices=("center", "random"))

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"scale": 1.0 - 0.5 * s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        n, _, h, w = x.shape
        side = math.sqrt(self.scale)
        ch = min(h, max(1, int(round(h * side))))
        cw = min(w, max(1, int(round(w * side))))
        if (ch, cw) == (h, w):
            return x.clamp(0.0, 1.0).clone()
        out = torch.empty_like(x)
        for i in range(n):
            if self.mode == "random":
                top = int(torch.randint(0, h - ch + 1, (1,), generator=generator).item())
                left = int(torch.randint(0, w - cw + 1, (1,), generator=generator).item())
            else:
                top, left = (h - ch) // 2, (w - cw) // 2
            window = x[i:i + 1, :, top:top + ch, left:left + cw]
            out[i:i + 1] = F.interpolate(window, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return out.clamp(0.0, 1.0).contiguous()
