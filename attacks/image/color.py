"""Photometric attacks: brightness, contrast and saturation (torchvision's ``adjust_*`` formulas)."""

from __future__ import annotations

from typing import Any

import torch

from markbench import image_attacks, ImageAttack, param

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of ``[N, 3, H, W]`` as ``[N, 1, H, W]``."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def _blend(x: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    """``clamp(factor * x + (1 - factor) * other)``."""
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


@image_attacks.register("brightness")
class Brightness(ImageAttack):
    """Brightness change: ``clamp(x * factor)`` (torchvision's ``adjust_brightness``).

    Strength mapping (WAVES range): ``factor = 1 + s`` (1 = unchanged up to 2 = twice as bright; s=0.5 gives the
    default 1.5).

    Origin: WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "brightness"
    distortion with factor 1-2.
    """

    version = "1"
    strength_mapping = "factor = 1 + s"
    deterministic = True
    factor: float = param(1.5, "multiplier of every pixel value (1 = unchanged)", low=0.0, high=10.0)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"factor": 1.0 + s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        return (x * self.factor).clamp(0.0, 1.0).contiguous()


@image_attacks.register("contrast")
class Contrast(ImageAttack):
    """Contrast change: ``clamp(factor * x + (1 - factor) * m)``, m = the image's mean luma (torchvision's formula).

    The mean ``m`` is taken per image over all pixels of its BT.601 luma, so images in a batch are independent.

    Strength mapping (WAVES range): ``factor = 1 + s`` (1 = unchanged up to 2; s=0.5 gives the default 1.5).

    Origin: WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "contrast"
    distortion with factor 1-2.
    """

    version = "1"
    strength_mapping = "factor = 1 + s"
    deterministic = True
    factor: float = param(1.5, "contrast factor (1 = unchanged, 0 = flat grey at the mean luma)", low=0.0, high=10.0)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"factor": 1.0 + s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean, self.factor).contiguous()


@image_attacks.register("saturation")
class Saturation(ImageAttack):
    """Saturation change: ``clamp(factor * x + (1 - factor) * luma(x))`` (torchvision's ``adjust_saturation``).

    Strength mapping: ``factor = 1 - s`` (1 = unchanged down to 0 = greyscale; s=0.5 gives the default 0.5). The
    desaturating direction is chosen because removing chroma is what threatens colour-channel marks (e.g.
    DWT-DCT in the U/V planes); oversaturation is available by setting ``factor > 1``. Not in WAVES (its
    photometric set is brightness and contrast); a standard colour-jitter augmentation.
    """

    version = "1"
    strength_mapping = "factor = 1 - s"
    deterministic = True
    factor: float = param(0.5, "saturation factor (1 = unchanged, 0 = greyscale, >1 = more saturated)", low=0.0,
            high=10.0)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"factor": 1.0 - s}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        return _blend(x, _grayscale(x), self.factor).contiguous()
