"""A chain of other image attacks applied at one common strength."""

from __future__ import annotations

from typing import Any

import torch

from markbench import image_attacks, ImageAttack, param

# The attacks a combination may chain: every other built-in image attack (not itself, so no recursion).
MEMBER_CHOICES = ("none", "jpeg", "gaussian_blur", "gaussian_noise", "salt_pepper", "median_filter", "resize",
                  "crop", "rotation", "brightness", "contrast", "saturation", "sharpen")
DEFAULT_MEMBERS = ["crop", "brightness", "contrast", "gaussian_blur", "gaussian_noise", "jpeg"]


@image_attacks.register("combination")
class Combination(ImageAttack):
    """Combined distortion: applies each attack in ``members``, in order, all at the same normalised strength.

    Each member is looked up in the registry (``image_attacks.get(name)``) and built with
    ``strength=level``, i.e. through its own ``from_strength`` mapping (documented in each member). All members
    draw their randomness, one after the other, from the same stage generator.

    Strength mapping: ``level = s`` (the common strength handed to every member). When ``strength`` is unset,
    ``level`` (default 0.5) is used instead, so ``combination(level=x)`` equals ``combination(strength=x)``.

    Origin: WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "combined"
    geometric + photometric + degradation distortions at a common strength; the default chain is resized crop,
    brightness, contrast, Gaussian blur, Gaussian noise and JPEG.
    """

    version = "1"
    strength_mapping = "level = s"
    zero_strength_tolerance = 0.03
    members: list[str] = param(list(DEFAULT_MEMBERS), "attacks applied in this order", choices=MEMBER_CHOICES)
    level: float = param(0.5, "common strength of the members when 'strength' is unset", low=0.0, high=1.0)

    def __init__(self, **given: Any):
        super().__init__(**given)
        self._chain = [image_attacks.get(name)(strength=self.level) for name in self.members]

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"level": s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32).clamp(0.0, 1.0)
        for attack in self._chain:
            x = attack.apply(x, generator)
        return x.to(torch.float32).clamp(0.0, 1.0).contiguous()
