"""Trigger specificity: does the mark wake for random strings in the trigger's place, or only for the trigger?

A trigger-activated watermark (SleeperMark: Wang et al., "SleeperMark: Towards Robust Watermark against Fine-Tuning
Text-to-image Diffusion Models", CVPR 2025) rests on its trigger being a secret the mark answers to alone. The
``[no_trigger]`` row checks that trigger-free prompts leave the mark asleep; this metric checks *other* strings in
the trigger's place: the harness generates the watermarked (attacked) model's images (before any image attack) with
``strings`` random strings of the trigger's token length put where the trigger goes (the run's prompts and seeds,
``per_string`` images each; :mod:`bench.triggers`) and the verifier reads them with the key. A string *wakes* the
mark when at least half of its images are detected at the run's threshold (the ``tpr`` metric's: analytic for bits,
set on the cell's negatives for scores).

Outputs (trigger row of a defence that declares ``prompt_trigger``; nothing elsewhere):

* ``random_trigger_wake@<fpr>``: the share of the random strings that wake the mark, exact Clopper-Pearson 95%
  interval, ``n`` = strings. Read it against the same cell's ``tpr@<fpr>`` (the true trigger): a trigger search that
  "finds a string that wakes the mark" means little where this share is near 1.
* ``random_trigger_bit_accuracy``: mean bit accuracy of the probe images (multi-bit defences; 95% bootstrap over
  images).

Defender's side: the harness reads the trigger (its token length and place) from the embedding and the verifier
uses the key; no attack sees either.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from markbench import param, stats
from markbench.measures.detection import decisions
from markbench.plugins import DetectionKind, MeasureContext, Measurement, Metric
from markbench.registries import metrics

_SEED = 0


@metrics.register("trigger_specificity")
class TriggerSpecificity(Metric):
    """Share of random strings of the trigger's token length, put in the trigger's place, that wake the mark.
    See the module docstring."""

    version = "1"
    higher_is_better = False  # for the defender: a specific trigger wakes for no random string
    strings: int = param(16, "random strings of the trigger's token length (the interval's n)", low=1, high=4096)
    per_string: int = param(1, "images per string (a string wakes the mark when at least half of them are "
                            "detected)", low=1, high=64)

    @classmethod
    def outputs(cls, params, target_fprs):
        return tuple(f"random_trigger_wake@{f:g}" for f in target_fprs) + ("random_trigger_bit_accuracy",)

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        load = ctx.detections.get("random_trigger")
        if load is None:
            return []
        probe = dataclasses.replace(ctx, detection=load())
        out: list[Measurement] = []
        for label, pos, _, rule in decisions(probe):
            if pos.size == 0:
                continue
            wakes = wake_per_string(pos, self.per_string)
            est = stats.rate(int(wakes.sum()), int(wakes.size))
            out.append(_as_measurement(f"random_trigger_wake@{label}", est, samples=wakes,
                                       note=f"{wakes.size} random strings of the trigger's token length in its "
                                            f"place, {self.per_string} image(s) each; a string wakes the mark when at "
                                            f"least half of its images are detected ({rule}); 95% Clopper-Pearson"))
        bits = probe.detection.bits
        if DetectionKind(ctx.defense.detection) is DetectionKind.BITS and bits is not None and len(bits):
            message = ctx.message.reshape(-1).bool().cpu()
            acc = (bits.bool().cpu() == message[None, :]).double().mean(dim=1).numpy()
            out.append(_as_measurement("random_trigger_bit_accuracy", stats.bootstrap(acc, "mean", seed=_SEED),
                                       samples=acc, note=f"{acc.size} images with random strings in the trigger's "
                                                         f"place; 95% bootstrap over images"))
        return out


def _as_measurement(name: str, est: stats.Estimate, samples: np.ndarray, note: str) -> Measurement:
    finite = (lambda x: None if x is None or not np.isfinite(x) else float(x))
    return Measurement(name=name, value=float(est.value), low=finite(est.low), high=finite(est.high), n=int(est.n),
                       note=note, higher_is_better=False, samples=tuple(float(v) for v in np.asarray(samples).ravel()))


def wake_per_string(detected: np.ndarray, per_string: int) -> np.ndarray:
    """Per string, whether it wakes the mark: at least half of its ``per_string`` consecutive images detected."""
    d = np.asarray(detected, dtype=bool).ravel()
    if d.size % per_string:
        raise ValueError(f"{d.size} probe images are not a whole number of strings of {per_string} images")
    return d.reshape(-1, per_string).mean(axis=1) >= 0.5
