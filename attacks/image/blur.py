"""Gaussian blur."""

from __future__ import annotations

import math
from typing import Any

import torch

from markbench import ConfigError, image_attacks, ImageAttack, param
from markbench.noise import separable_gaussian_blur


def default_sigma(kernel_size: int) -> float:
    """The sigma OpenCV and torchvision derive from a kernel size: ``0.3 * ((k - 1) / 2 - 1) + 0.8``."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8


@image_attacks.register("gaussian_blur")
class GaussianBlur(ImageAttack):
    """Gaussian blur with an odd square kernel (separable convolution, reflect padding).

    ``sigma`` unset means the OpenCV/torchvision rule ``sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8``.

    Strength mapping (WAVES kernel range 0-20): ``k = round(20 * s)``, bumped to the next odd number (so k runs
    1, 3, ..., 21; k = 1 is the identity) and ``sigma`` by the rule above (s=0.5: k=11, sigma=2.0, the defaults).

    Origin: WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "Gaussian
    blur" distortion with kernel size 0-20.
    """

    version = "1"
    strength_mapping = "kernel_size = odd(round(20 s)) and sigma"
    deterministic = True
    kernel_size: int = param(11, "odd kernel side in pixels (1 = no blur)", low=1, high=101)
    sigma: float | None = param(None, "standard deviation in pixels; unset = derived from kernel_size", low=0.01,
            high=100.0)

    def __init__(self, **given: Any):
        super().__init__(**given)
        if self.kernel_size % 2 != 1:
            raise ConfigError(f"kernel_size = {self.kernel_size} is invalid for '{self.name or 'gaussian_blur'}': "
                              f"it must be an odd integer in [1, 101]")

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        k = int(math.floor(20.0 * s + 0.5))
        if k % 2 == 0:
            k += 1
        return {"kernel_size": k, "sigma": default_sigma(k)}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.detach().to(torch.float32)
        k = self.kernel_size
        sigma = self.sigma if self.sigma is not None else default_sigma(k)
        return separable_gaussian_blur(x, k, sigma).clamp(0.0, 1.0).contiguous()
