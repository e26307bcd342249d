"""Down-scaling and re-scaling (resolution loss)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from markbench import image_attacks, ImageAttack, param


@image_attacks.register("resize")
class Resize(ImageAttack):
    """Resize attack: downsample by ``scale`` (anti-aliased) and resize back up to the original size.

    The intermediate size is ``max(1, round(H * scale)) x max(1, round(W * scale))``; both steps use
    ``torch.nn.functional.interpolate`` with ``mode`` and ``antialias=True``. A scale that leaves the size
    unchanged returns the input.

    Strength mapping: ``scale = 1 - 0.75 * s`` (1 down to 0.25 of the side; s=0.5 gives the default 0.625). Not in
    WAVES; the resize/rescale attack of StirMark-style benchmarks (Petitcolas et al., 1998).
    """

    version = "1"
    strength_mapping = "scale = 1 - 0.75 s"
    deterministic = True
    scale: float = param(0.625, "side-length factor of the intermediate image", low=0.01, high=1.0)
    mode: str = param("bilinear", "interpolation used for both steps", choices=("bilinear", "bicubic"))

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"scale": 1.0 - 0.75 * s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        h, w = x.shape[-2:]
        sh = max(1, int(round(h * self.scale)))
        sw = max(1, int(round(w * self.scale)))
        if (sh, sw) == (h, w):
            return x.clamp(0.0, 1.0).clone()
        kw = {"mode": self.mode, "align_corners": False, "antialias": True}
        small = F.interpolate(x, size=(sh, sw), **kw)
        back = F.interpolate(small, size=(h, w), **kw)
        return back.clamp(0.0, 1.0).contiguous()
