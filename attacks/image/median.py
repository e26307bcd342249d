"""Median filter."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from markbench import ConfigError, image_attacks, ImageAttack, param


@image_attacks.register("median_filter")
class MedianFilter(ImageAttack):
    """Median filter with an odd square window, per channel, reflect padding at the borders.

    Strength mapping: ``kernel_size = 1 + 2 * round(4 * s)``, i.e. 1 (identity), 3, 5, 7, 9 (s=0.5 gives the
    default 5). Not in WAVES; the classic non-linear denoising attack of StirMark-style benchmarks (Petitcolas
    et al., 1998).
    """

    version = "1"
    strength_mapping = "kernel_size = 1 + 2 round(4 s)"
    deterministic = True
    kernel_size: int = param(5, "odd window side in pixels (1 = no filtering)", low=1, high=31)

    def __init__(self, **given: Any):
        super().__init__(**given)
        if self.kernel_size % 2 != 1:
            raise ConfigError(f"kernel_size = {self.kernel_size} is invalid for '{self.name or 'median_filter'}': "
                              f"it must be an odd integer in [1, 31]")

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"kernel_size": 1 + 2 * int(math.floor(4.0 * s + 0.5))}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        k = self.kernel_size
        if k <= 1:
            return x.clamp(0.0, 1.0).clone()
        pad = k // 2
        out = torch.empty_like(x)
        # One image at a time bounds the memory of the unfolded windows (k*k copies of the image).
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            h, w = xi.shape[-2:]
            mode = "reflect" if pad < h and pad < w else "replicate"
            padded = F.pad(xi, (pad, pad, pad, pad), mode=mode)
            windows = padded.unfold(2, k, 1).unfold(3, k, 1)  # [1, C, H, W, k, k]
            out[i:i + 1] = windows.reshape(*windows.shape[:4], k * k).median(dim=-1).values
        return out.clamp(0.0, 1.0).contiguous()
