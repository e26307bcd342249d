"""The identity image attack (no distortion)."""

from __future__ import annotations

from typing import Any

import torch

from markbench import ImageAttack, image_attacks


@image_attacks.register("none")
class Identity(ImageAttack):
    """No attack: returns the images unchanged (the clean reference row of every sweep).

    Strength mapping: accepted for uniformity and ignored (``from_strength`` returns ``{}``).
    """

    version = "1"
    strength_mapping = "nothing (the identity has no strength)"
    deterministic = True
    identity = True  # the planner adds no stage for it

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images.detach().to(torch.float32).clamp(0.0, 1.0).clone()
