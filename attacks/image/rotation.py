"""Rotation about the image centre."""

from __future__ import annotations

from typing import Any

import torch
from kornia.geometry.transform import rotate

from markbench import image_attacks, ImageAttack, param


@image_attacks.register("rotation")
class Rotation(ImageAttack):
    """Rotation by ``degrees`` (counter-clockwise as displayed) about the centre, bilinear, black fill.

    Uses ``kornia.geometry.transform.rotate`` (output keeps the input size; corners that leave the frame are lost,
    uncovered areas are black). The angle is exactly the parameter: no random sign. 0 degrees returns the input.

    Strength mapping (WAVES range): ``degrees = 45 * s`` (s=0.5 gives the default 22.5).

    Origin: WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "rotation"
    distortion with 0-45 degrees.
    """

    version = "1"
    strength_mapping = "degrees = 45 s"
    deterministic = True
    degrees: float = param(22.5, "rotation angle in degrees, positive = counter-clockwise", low=-180.0, high=180.0)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"degrees": 45.0 * s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        if self.degrees == 0.0:
            return x.clamp(0.0, 1.0).clone()
        angle = torch.full((x.shape[0],), self.degrees, dtype=torch.float32, device=x.device)
        out = rotate(x, angle, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.clamp(0.0, 1.0).contiguous()
