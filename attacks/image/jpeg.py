"""JPEG compression with the real codec (Pillow / libjpeg: :func:`bench.noise.pil_jpeg`, which the defences' noise
layers also use)."""

from __future__ import annotations

import math
from typing import Any

import torch

from markbench import image_attacks, ImageAttack, param
from markbench.noise import pil_jpeg


@image_attacks.register("jpeg")
class JPEG(ImageAttack):
    """JPEG compression: encode and decode each image with Pillow's JPEG codec at a given quality.

    Each image is quantised to 8 bits (``round(x * 255)``), encoded in memory with ``PIL.Image.save(format="JPEG",
    quality=q, subsampling=...)`` and decoded back; the output is the decoded image divided by 255.

    Strength mapping (WAVES range): ``quality = round(90 - 80 * s)``, i.e. quality 90 at s=0 down to 10 at s=1
    (s=0.5 gives the default 50).

    Origin: WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "JPEG
    compression" distortion with quality 90-10.
    """

    version = "1"
    strength_mapping = "quality = round(90 - 80 s)"
    deterministic = True
    zero_strength_tolerance = 0.03
    strength_effect = "psnr"
    quality: int = param(50, "JPEG quality factor (1 = worst, 100 = best)", low=1, high=100)
    subsampling: str = param("4:2:0", "chroma subsampling used by the encoder", choices=("4:4:4", "4:2:2", "4:2:0"))

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"quality": int(math.floor(90.0 - 80.0 * s + 0.5))}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        return pil_jpeg(x, self.quality, self.subsampling).clamp(0.0, 1.0).contiguous()
