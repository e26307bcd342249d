"""Averaging attack: estimate a fixed watermark pattern from many marked images and subtract it."""

from __future__ import annotations

from typing import Any

import torch

from markbench import AttackContext, image_attacks, ImageAttack, param
from markbench.noise import gaussian_blur_sigma


@image_attacks.register("averaging")
class Averaging(ImageAttack):
    """Averaging (removal): estimate a fixed-key mark as mean(marked) - mean(clean-like) over n images, subtract it.

    The averaging attack of WIBE (the watermarking benchmark's "averaging" attack) and Yang et al. 2024
    ("Steganalysis on digital watermarking: is your defense truly impervious?"): a watermark that adds the same
    pattern to every image survives in the average of many marked images while the images' own content averages
    out. The attacker here has only the marked images it is shown: the n images of its batch (the cell's images,
    in order), and as "clean-like" counterparts a denoised version of each (a Gaussian blur of ``blur_sigma``), so
    ``pattern = mean_i(x_i - blur(x_i))`` over the first n images, and every image becomes
    ``clamp(x - pattern, 0, 1)``. (Clean images from the base model, which an attacker of released weights could
    generate, are not offered by the harness; the blur stands in for them and removes only the pattern's high
    frequencies.)

    Applies to marks that do not depend on the image (a fixed additive pattern, the same key and message in every
    image: e.g. a fixed spatial or frequency pattern). Marks that depend on the image (DWT-DCT's coefficient
    quantisation, HiDDeN's encoder output, in-model marks) are not removed by a mean: the attack is then mostly the
    subtraction of the images' average high-frequency texture, which its matrix shows.

    Forgery (``mode = "forge"``; WIBE's and Yang et al.'s spoofing use of the same estimate): the pattern estimated
    from the marked images the attacker has is *added* to clean images, ``clamp(c + pattern)``, so that a verifier
    accuses them. The harness hands the cell's marked images (same prompts and seeds as the clean images); forged
    image i uses the pattern estimated without marked image i (leave-one-out), so the attacker never uses the
    marked twin of the image it forges.

    Cost recorded: ``attacker_images`` = n, ``model_evals`` = 0 (no network).

    Strength mapping: the number of images ``n = round(2 ** (1 + 5 s))``, 2 at s = 0 to 64 at s = 1 (default 11 at
    s = 0.5), capped at the batch's size. More images give a better estimate of the fixed pattern and less of the
    images' content, so strength is measured by how close a batch carrying a fixed pattern comes back to its
    unmarked images (``strength_effect = "fixed_mark"``), not by the size of the change.
    """

    version = "1"
    strength_mapping = "images n = round(2 ** (1 + 5 s)), capped at the batch"
    strength_effect = "fixed_mark"
    zero_strength_tolerance = 0.05
    images: int = param(11, "how many of the batch's images the pattern is estimated from (n)", low=1, high=100000)
    blur_sigma: float = param(1.5, "std (px) of the Gaussian blur that makes the clean-like images", low=0.1, high=20.0)
    mode: str = param("remove", "'remove': subtract the pattern from marked images; 'forge': add it to clean images "
                      "(a forgery cell)", choices=("remove", "forge"), keyed_at_default=False)
    can_forge = True
    forge_params = {"mode": "forge"}

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"images": int(round(2 ** (1 + 5 * s)))}

    def pattern(self, images: torch.Tensor) -> torch.Tensor:
        """The estimated fixed pattern ``[1, 3, H, W]`` from the first ``min(n, N)`` images."""
        x = images[: max(1, min(self.images, images.shape[0]))].to(torch.float32)
        return (x - gaussian_blur_sigma(x, self.blur_sigma)).mean(0, keepdim=True)

    @property
    def forges(self) -> bool:
        return self.mode == "forge"

    def apply(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext | None = None
              ) -> torch.Tensor:
        x = images.to(torch.float32)
        if ctx is not None:
            ctx.record_cost(attacker_images=max(1, min(self.images, x.shape[0])), model_evals=0)
        return (x - self.pattern(x)).clamp(0.0, 1.0)

    def forge(self, clean: torch.Tensor, marked: torch.Tensor, generator: torch.Generator,
              ctx: AttackContext) -> torch.Tensor:
        """``clamp(clean_i + pattern_i)``, ``pattern_i`` the mean residual of the first n marked images without
        marked image i (leave-one-out; all n when i is not among them, or when n = 1)."""
        m = marked[: max(1, min(self.images, marked.shape[0]))].to(torch.float32)
        ctx.record_cost(attacker_images=int(m.shape[0]), model_evals=0)
        r = m - gaussian_blur_sigma(m, self.blur_sigma)
        total, n = r.sum(0, keepdim=True), r.shape[0]
        c = clean.to(torch.float32)
        pattern = total.expand_as(c).clone() / n
        if n > 1:
            k = min(n, c.shape[0])
            pattern[:k] = (total - r[:k]) / (n - 1)
        return (c + pattern).clamp(0.0, 1.0)
