"""The attacker's side of a cell: forgery (false positives on forged clean images) and joint success.

* ``forgery``: in a forgery cell (``ctx.axis == "forgery"``: a forging image attack made the clean model's images
  read as marked, :class:`bench.ImageAttack`), the false-positive rate of the forged images at the defence's own
  threshold, ``forged_fpr@<fpr>``, beside the same rate on the clean images before forging, ``clean_fpr@<fpr>``
  (the baseline the forgery raises). Clopper-Pearson 95% intervals; ``n`` = images. The forged images' quality
  (PSNR / SSIM to the clean image they were made from) is ``psnr_attack`` / ``ssim_attack`` of the same cell, and
  ``joint_forgery@<fpr>`` below combines both. Nothing is returned in removal cells.
* ``joint_evasion``: the rate that matters to an attacker, per image rather than on average: in a removal cell the
  fraction of images that are *not* detected at the defence's threshold **and** stay within the quality bound
  (PSNR and SSIM to the attack's input at least ``min_psnr`` / ``min_ssim``) **and**, where the world has a judge
  (``content``; the tiny world's zero-shot CLIP reads the same shape and colour: :meth:`bench.world.World.
  same_content`), keep their content: ``joint_evasion@<fpr>``. In a forgery cell the same with *detected* in place
  of *not detected*: ``joint_forgery@<fpr>``. Also ``quality_kept`` (the bound alone) and ``content_kept`` (the
  judge alone). Clopper-Pearson 95% intervals.

Thresholds are the ``tpr`` metric's: analytic for multi-bit defences (label ``1e-06``), set on the negatives for
zero-bit ones (label ``fpr<=k/N``): :func:`bench.measures.detection.decisions`.
"""

from __future__ import annotations

import numpy as np
import torch

from markbench import stats
from markbench.measures.clip_score import DEFAULT_CLIP_MODEL
from markbench.measures.detection import decisions
from markbench import param
from markbench.plugins import MeasureContext, Measurement, Metric
from markbench.registries import metrics


def _rate(name: str, hits: np.ndarray, note: str, higher_is_better: bool | None) -> Measurement:
    est = stats.rate(int(np.asarray(hits).sum()), int(np.asarray(hits).size))
    return Measurement(name=name, value=float(est.value), low=est.low, high=est.high, n=int(est.n), note=note,
                       higher_is_better=higher_is_better, samples=tuple(float(v) for v in np.asarray(hits).ravel()))


@metrics.register("forgery")
class Forgery(Metric):
    """False-positive rate of forged clean images at the defence's threshold (forgery cells only).

    ``forged_fpr@<fpr>``: the fraction of forged images the verifier accepts as marked (the analytic binomial
    threshold for bits, the threshold set on the clean negatives for scores); ``clean_fpr@<fpr>``: the same on the
    clean images before forging. 95% Clopper-Pearson. See the module docstring.
    """

    version = "1"
    higher_is_better = False

    @classmethod
    def outputs(cls, params, target_fprs):
        return tuple(f"{r}@{f:g}" for f in target_fprs for r in ("forged_fpr", "clean_fpr"))

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        if ctx.axis != "forgery":
            return []
        out = []
        for label, pos, neg, rule in decisions(ctx):
            if pos.size:
                out.append(_rate(f"forged_fpr@{label}", pos, f"forged clean images accepted as marked; {rule}; "
                                 f"95% Clopper-Pearson", higher_is_better=False))
            if neg.size:
                out.append(_rate(f"clean_fpr@{label}", neg, f"the same clean images before forging; {rule}",
                                 higher_is_better=False))
        return out


def _per_image_quality(preds: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if preds.shape[-2:] != target.shape[-2:]:
        preds = torch.nn.functional.interpolate(preds.float(), size=target.shape[-2:], mode="bilinear",
                                                align_corners=False, antialias=True).clamp(0, 1)
    psnr, ssim = [], []
    for i in range(0, preds.shape[0], 16):
        p, t = preds[i:i + 16].float(), target[i:i + 16].float()
        psnr.append(peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=100.0))
        ssim.append(structural_similarity_index_measure(p, t, data_range=1.0, reduction="none"))
    return torch.cat(psnr).double().numpy(), torch.cat(ssim).double().numpy()


@metrics.register("joint_evasion")
class JointEvasion(Metric):
    """Per-image joint success of an attack: evades (removal) or fools (forgery) the verifier **and** stays within
    a quality bound **and** keeps its content (where the world can judge it). See the module docstring."""

    version = "1"
    needs_images = True
    higher_is_better = False  # for the defender: a lower joint evasion is better
    min_psnr: float = param(25.0, "quality bound: PSNR (dB) of the attacked image to the attack's input at least "
                            "this (0: no PSNR bound)", low=0.0, high=100.0)
    min_ssim: float = param(0.0, "quality bound: SSIM to the attack's input at least this (0: no SSIM bound)",
                            low=0.0, high=1.0)
    content: bool = param(True, "also require the world's judge (the tiny CLIP) to read the same content as in "
                          "the input, where the world has one")
    clip_model: str = param(DEFAULT_CLIP_MODEL, "which world's judge: a CLIP model name a world recommends")

    @classmethod
    def outputs(cls, params, target_fprs):
        return (tuple(f"{r}@{f:g}" for f in target_fprs for r in ("joint_evasion", "joint_forgery"))
                + ("quality_kept", "content_kept"))

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        images, inputs = ctx.images(), ctx.unattacked_images()
        psnr, ssim = _per_image_quality(images, inputs)
        quality = (psnr >= self.min_psnr) & (ssim >= self.min_ssim)
        bound = f"PSNR >= {self.min_psnr:g} dB and SSIM >= {self.min_ssim:g} to the attack's input"
        out = [_rate("quality_kept", quality, f"images within the bound ({bound})", higher_is_better=None)]
        kept = np.ones(quality.shape, dtype=bool)
        judged = ""
        if self.content:
            from markbench.world import world_for_clip_model

            world = world_for_clip_model(self.clip_model)
            same = world.same_content(images, inputs) if world is not None else None
            if same is not None:
                kept = np.asarray(same, dtype=bool)
                judged = f" and the '{world.name}' world's judge reads the same content"
                out.append(_rate("content_kept", kept, f"the '{world.name}' world's judge reads the same content "
                                 "as in the attack's input", higher_is_better=None))
        forgery = ctx.axis == "forgery"
        for label, pos, _, rule in decisions(ctx):
            if not pos.size:
                continue
            success = (pos if forgery else ~pos) & quality & kept
            what = "accepted as marked" if forgery else "not detected"
            out.append(_rate(f"{'joint_forgery' if forgery else 'joint_evasion'}@{label}", success,
                             f"images {what} ({rule}) within {bound}{judged}; 95% Clopper-Pearson",
                             higher_is_better=False))
        return out
