"""Image-quality metrics: the mark's cost and the attack's distortion, per image, then the mean over images.

Two comparisons per metric:

* ``<metric>_watermark``: ``ctx.unattacked_images()`` (marked, before the image attack) against ``ctx.twins()``,
  the right twin: the clean model (same model attack) making the same images the same way (same prompts and seeds;
  for a trigger defence the clean model given the trigger, so the trigger's own effect on the content is not
  counted as the mark's cost; for post-hoc marks the unmarked images): what the mark costs. For a defence without a
  paired twin (``ctx.paired_twin`` False: its ``quality_measures`` lack ``QualityMeasure.PAIRED``, a mark in the
  initial noise, whose clean counterpart is another image) the value is NaN with a note saying so.
* ``<metric>_attack``: ``ctx.images()`` (after the image attack) against ``ctx.unattacked_images()``: how much the
  attack changed the image.

Images are ``[N, 3, H, W]`` in [0, 1] (data range 1.0). If an attack changed the size (crop, resize), the attacked
images are resized back (bilinear, antialiased) to the reference size before comparing, and the note says so.
The interval is the 95% Student-t interval of the mean over images.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from markbench import stats
from markbench.plugins import MeasureContext, Measurement, Metric
from markbench.registries import metrics

PSNR_CAP_DB = 100.0
_CHUNK = 16  # images per call, to bound memory at 512 px and above


def _match_size(preds: torch.Tensor, target: torch.Tensor, what: str) -> tuple[torch.Tensor, str]:
    if preds.shape[0] != target.shape[0]:
        raise ValueError(f"{what}: {preds.shape[0]} images against {target.shape[0]} references")
    if preds.shape[-2:] == target.shape[-2:]:
        return preds, ""
    h, w = target.shape[-2:]
    note = f"images resized from {preds.shape[-2]}x{preds.shape[-1]} to {h}x{w} to compare"
    return F.interpolate(preds.float(), size=(h, w), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1), note


class _PairedImageMetric(Metric):
    """Shared driver: a per-image function of (preds, target), averaged with a t-interval."""

    needs_images = True
    higher_is_better = True
    _label = ""

    def per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _values(self, preds: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, preds.shape[0], _CHUNK):
            out.append(self.per_image(preds[i:i + _CHUNK].float(), target[i:i + _CHUNK].float()).double())
        return torch.cat(out).cpu().numpy() if out else np.zeros(0)

    def _one(self, name: str, load_preds: Callable[[], torch.Tensor], load_target: Callable[[], torch.Tensor],
             what: str) -> list[Measurement]:
        target = load_target()
        preds, note = _match_size(load_preds(), target, f"{self.name} {name}")
        values = self._values(preds, target)
        if values.size == 0:
            return []
        est = stats.mean_t_interval(values)
        n_capped = self._capped(values)
        parts = [f"mean over {values.size} images of {self._label}({what}); 95% t-interval"]
        if n_capped:
            parts.append(f"{n_capped} image(s) at the {PSNR_CAP_DB:g} dB cap")
        if note:
            parts.append(note)
        clean = lambda x: x if math.isfinite(x) else None  # noqa: E731
        return [Measurement(name=name, value=est.value, low=clean(est.low), high=clean(est.high), n=est.n,
                            note="; ".join(parts), higher_is_better=True, samples=tuple(values.tolist()))]

    def _capped(self, values: np.ndarray) -> int:
        return 0

    @classmethod
    def outputs(cls, params, target_fprs):
        return (f"{cls.name}_watermark", f"{cls.name}_attack")

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        if not ctx.paired_twin:
            # the mark changes the initial noise: the clean twin is another image, so the paired comparison
            # measures the noise, not the mark (FID / CLIP score against the clean model apply instead)
            n = ctx.unattacked_images().shape[0]
            watermark = [Measurement(name=f"{self.name}_watermark", value=float("nan"), n=n,
                                     note=f"not applicable to {ctx.defense.name}: its mark changes the initial noise, "
                                          "so the clean twin is a different image; see fid / clip_score",
                                     higher_is_better=True)]
        else:
            watermark = self._one(f"{self.name}_watermark", ctx.unattacked_images, ctx.twins,
                                  "marked unattacked vs the clean model's twin made the same way")
        return (watermark
                + self._one(f"{self.name}_attack", ctx.images, ctx.unattacked_images,
                            "attacked vs unattacked"))


@metrics.register("psnr")
class PSNR(_PairedImageMetric):
    """PSNR in dB (data range 1.0): ``psnr_watermark`` (mark's cost) and ``psnr_attack`` (attack's distortion).

    Per image ``10 log10(1 / MSE)`` over all channels and pixels (torchmetrics), then the mean with a 95% t-interval.
    Identical images have infinite PSNR: every per-image value is capped at 100 dB (the note counts capped images).
    With 8-bit images a single 1-level change in a 512x512 image is already ~107 dB, so 100 dB means "essentially
    identical".
    """

    version = "2"
    _label = "PSNR"

    def per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        v = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
        return torch.clamp(v, max=PSNR_CAP_DB)  # inf -> cap

    def _capped(self, values: np.ndarray) -> int:
        return int((values >= PSNR_CAP_DB).sum())


@metrics.register("ssim")
class SSIM(_PairedImageMetric):
    """SSIM (Gaussian window 11, sigma 1.5, data range 1.0): ``ssim_watermark`` and ``ssim_attack``.

    Per-image SSIM from torchmetrics (mean over channels and pixels), then the mean with a 95% t-interval.
    Computed in float32 (float64 is ~10x slower on CPU): identical images give 1 up to rounding, which on large
    flat regions can reach a few 1e-4 (the local variances are differences of nearly equal float32 numbers).
    Images must be at least 11 px on each side.
    """

    version = "2"
    _label = "SSIM"

    def per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.image import structural_similarity_index_measure

        return structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
