"""Salt-and-pepper (impulse) noise."""

from __future__ import annotations

from typing import Any

import torch

from markbench import image_attacks, ImageAttack, param


@image_attacks.register("salt_pepper")
class SaltPepper(ImageAttack):
    """Salt-and-pepper noise: a fraction ``amount`` of pixels is set to white (salt) or black (pepper).

    A pixel is hit in all three channels at once. One uniform draw ``u`` per pixel (from the stage generator,
    independently per image): ``u < amount * salt_vs_pepper`` becomes 1, ``amount * salt_vs_pepper <= u < amount``
    becomes 0, the rest is unchanged.

    Strength mapping: ``amount = 0.1 * s`` (0-10% of the pixels; s=0.5 gives the default 0.05). Not in WAVES;
    the classic impulse-noise attack of StirMark-style benchmarks (Petitcolas et al., 1998).
    """

    version = "1"
    strength_mapping = "amount = 0.1 s"
    amount: float = param(0.05, "fraction of pixels replaced by salt or pepper", low=0.0, high=1.0)
    salt_vs_pepper: float = param(0.5, "fraction of the hit pixels that become white", low=0.0, high=1.0)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"amount": 0.1 * s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32).clamp(0.0, 1.0).clone()
        amount = self.amount
        if amount == 0.0:
            return x
        n, _, h, w = x.shape
        # drawn on the generator's device (the harness's is a CPU generator), then moved to the images'
        u = torch.rand((n, 1, h, w), generator=generator, dtype=torch.float32,
                       device=generator.device if generator is not None else x.device).to(x.device)
        salt_cut = amount * self.salt_vs_pepper
        salt = (u < salt_cut).expand_as(x)
        pepper = ((u >= salt_cut) & (u < amount)).expand_as(x)
        x = x.masked_fill(salt, 1.0).masked_fill(pepper, 0.0)
        return x.contiguous()
