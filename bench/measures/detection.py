"""Detection metrics: what the verifier read from a cell's images (positives) and from its negatives.

Multi-bit defences (``DetectionKind.BITS``): per image, ``matches = (bits == message).sum(1)``; under the null
hypothesis matches ~ Binomial(k, 0.5) and an image is detected iff ``matches >= tau`` with the analytic threshold
:func:`bench.stats.bit_threshold` (48 bits at FPR 1e-6: tau = 41). Zero-bit defences (``DetectionKind.SCORE``): an
image is detected iff ``score > threshold``, the threshold set on the negatives' scores
(:func:`bench.stats.empirical_threshold`), and its metrics are named by the FPR the negatives resolve
(``tpr@fpr<=1/32``), never by the target (a bare ``tpr@1e-06`` is always an analytic threshold).

Intervals are 95%: Clopper-Pearson for rates, a deterministic percentile bootstrap over images (fixed seed 0) for
means, medians and the AUC, so the same data always give the same numbers. A measurement that cannot be computed
(no positives, no negatives where they are needed, a measurement that does not apply to the defence's kind) is
left out rather than reported as NaN.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from markbench import stats
from markbench.plugins import Detection, DetectionKind, MeasureContext, Measurement, Metric
from markbench.registries import metrics

_SEED = 0  # bootstrap seed: intervals depend on the data only


def _measurement(name: str, est: stats.Estimate, *, note: str = "",
                 higher_is_better: bool | None = None, samples: Any = None, samples_neg: Any = None) -> Measurement:
    def clean(x: float) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    def floats(a: Any) -> tuple[float, ...] | None:
        return None if a is None else tuple(float(v) for v in np.asarray(a).ravel())

    return Measurement(name=name, value=float(est.value), low=clean(est.low), high=clean(est.high), n=int(est.n),
                       note=note, higher_is_better=higher_is_better, samples=floats(samples),
                       samples_neg=floats(samples_neg))


def _kind(ctx: MeasureContext) -> DetectionKind:
    return DetectionKind(ctx.defense.detection)


def _message(ctx: MeasureContext) -> Any:
    if ctx.message is None:
        raise ValueError(f"defence '{getattr(ctx.defense, 'name', ctx.defense)}' returns bits but the cell has no "
                         f"message (ctx.message is None)")
    return ctx.message.reshape(-1).bool().cpu()


def _matches(det: Detection | None, message: Any, what: str) -> np.ndarray:
    """Per-image number of bits equal to ``message`` (int array ``[N]``); empty when there are no bits."""
    if det is None or det.bits is None:
        return np.zeros(0, dtype=np.int64)
    bits = det.bits.bool().cpu()
    if bits.ndim != 2 or bits.shape[1] != message.numel():
        raise ValueError(f"{what}: bits of shape {tuple(bits.shape)} do not fit a message of {message.numel()} bits "
                         f"(expected [N, {message.numel()}])")
    return (bits == message[None, :]).sum(dim=1).numpy().astype(np.int64)


def _scores(det: Detection | None, what: str) -> np.ndarray:
    if det is None or det.scores is None:
        return np.zeros(0, dtype=np.float64)
    s = det.scores.detach().cpu().double().reshape(-1).numpy()
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what}: scores must be finite")
    return s


def _bits_data(ctx: MeasureContext) -> tuple[np.ndarray, np.ndarray, int]:
    msg = _message(ctx)
    return (_matches(ctx.detection, msg, "detection"), _matches(ctx.negatives, msg, "negatives"), int(msg.numel()))


@metrics.register("bit_accuracy")
class BitAccuracy(Metric):
    """Mean per-image bit accuracy of a multi-bit mark (95% bootstrap over images), and the same on the negatives.

    ``bit_accuracy``: positives (1 = every bit read correctly). ``bit_accuracy_neg``: negatives, ~0.5 for an
    unmarked image. The interval resamples images, not bits (bits of one image are not independent). Zero-bit
    (score) defences: not applicable, nothing is returned.
    """

    version = "1"
    higher_is_better = True

    @classmethod
    def outputs(cls, params, target_fprs):
        return ("bit_accuracy", "bit_accuracy_neg")

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        if _kind(ctx) is not DetectionKind.BITS:
            return []
        pos, neg, k = _bits_data(ctx)
        out = []
        if pos.size:
            out.append(_measurement("bit_accuracy", stats.bit_accuracy(pos, k, generator_seed=_SEED),
                                    note=f"mean over {pos.size} images of matches/{k}; 95% bootstrap over images",
                                    higher_is_better=True, samples=pos / k))
        if neg.size:
            out.append(_measurement("bit_accuracy_neg", stats.bit_accuracy(neg, k, generator_seed=_SEED),
                                    note=f"negatives ({neg.size} images); ~0.5 expected without a mark",
                                    higher_is_better=None))
        return out


@metrics.register("tpr")
class TPRAtFPR(Metric):
    """TPR at each target FPR and the empirical FPR on the negatives; the name says what the FPR means.

    Bits (``tpr@<fpr>``, ``fpr@<fpr>``, e.g. ``tpr@1e-06``): detected iff matches >= tau, tau the smallest
    threshold with P(X >= tau) <= fpr, X ~ Binomial(k, 0.5): an analytic threshold, valid however few negatives
    there are. Scores (``tpr@fpr<=k/N``, ``fpr@fpr<=k/N``, e.g. ``tpr@fpr<=1/32``): detected iff score > a
    threshold set on the N negatives, which lets k = floor(fpr * N) of them through; a target below 1/N cannot be
    resolved (the threshold is the highest negative score) and is labelled ``fpr<=1/N``, the FPR N negatives can
    resolve; targets that give the same label are reported once. Intervals: exact Clopper-Pearson; ``n`` = number
    of positives (TPR) or negatives (FPR).
    """

    version = "2"
    higher_is_better = True

    @classmethod
    def outputs(cls, params, target_fprs):
        return tuple(f"{r}@{f:g}" for f in target_fprs for r in ("tpr", "fpr"))

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        if _kind(ctx) is DetectionKind.BITS:
            return self._bits(ctx)
        return self._scores(ctx)

    def _bits(self, ctx: MeasureContext) -> list[Measurement]:
        pos, neg, k = _bits_data(ctx)
        out = []
        for fpr in ctx.target_fprs:
            op = stats.tpr_at_fpr_bits(pos, neg, k, fpr)
            if op.threshold > k:
                rule = (f"{k} bits cannot reach FPR {fpr:g} (P(all {k} match) = {2.0 ** -k:.3g}): "
                        f"nothing is detected")
            else:
                rule = (f"detected iff matches >= {op.threshold} of {k} bits "
                        f"(P(X >= {op.threshold}) = {op.analytic_fpr:.3g}, X ~ Binomial({k}, 0.5))")
            if pos.size:
                out.append(_measurement(f"tpr@{stats.analytic_fpr_label(fpr)}", op.tpr, note=rule,
                                        higher_is_better=True, samples=pos >= op.threshold))
            if neg.size:
                note = f"empirical FPR on {neg.size} negatives; {rule}"
                if neg.size * fpr < 1:
                    note += f"; N_neg={neg.size} cannot resolve FPR {fpr:g} empirically (the threshold is analytic)"
                out.append(_measurement(f"fpr@{stats.analytic_fpr_label(fpr)}", op.fpr, note=note,
                                        higher_is_better=False))
        return out

    def _scores(self, ctx: MeasureContext) -> list[Measurement]:
        pos = _scores(ctx.detection, "detection")
        neg = _scores(ctx.negatives, "negatives")
        if neg.size == 0:
            return []  # no threshold can be set
        out = []
        seen: dict[str, float] = {}
        for fpr in ctx.target_fprs:
            label = stats.empirical_fpr_label(neg.size, fpr)
            if label in seen:  # two targets that N negatives cannot tell apart: one operating point, named once
                continue
            seen[label] = fpr
            op = stats.tpr_at_fpr_scores(pos, neg, fpr)
            rule = (f"empirical threshold: detected iff score > {op.threshold:.6g}, set on {neg.size} negatives for "
                    f"target FPR {fpr:g}; the label {label} is the FPR {neg.size} negatives resolve, not an "
                    f"analytic guarantee")
            if op.note:
                rule += f"; {op.note}"
            if pos.size:
                out.append(_measurement(f"tpr@{label}", op.tpr, note=rule, higher_is_better=True,
                                        samples=pos > op.threshold))
            out.append(_measurement(f"fpr@{label}", op.fpr, note=f"empirical FPR on the negatives; {rule}",
                                    higher_is_better=False))
        return out


@metrics.register("pvalue")
class PValue(Metric):
    """Median over the positives of log10 of the one-sided binomial p-value P(X >= matches), X ~ Binomial(k, 0.5).

    Lower is stronger evidence of the mark (48 of 48 bits: -14.45; chance: about -0.3). 95% bootstrap interval of
    the median over images. Multi-bit defences only; nothing is returned for score defences.
    """

    version = "1"
    higher_is_better = False

    @classmethod
    def outputs(cls, params, target_fprs):
        return ("log10_pvalue_median",)

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        if _kind(ctx) is not DetectionKind.BITS:
            return []
        pos, _, k = _bits_data(ctx)
        if pos.size == 0:
            return []
        lp = stats.log10_binomial_pvalue(pos, k)
        est = stats.bootstrap(lp, "median", seed=_SEED)
        return [_measurement("log10_pvalue_median", est, higher_is_better=False,
                             note=f"median over {pos.size} images of log10 P(X >= matches), X ~ Binomial({k}, 0.5); "
                                  f"95% bootstrap over images")]


@metrics.register("auc")
class ROCAUC(Metric):
    """ROC AUC of positives against negatives (Mann-Whitney, ties count half), 95% stratified bootstrap interval.

    Score: the number of matching bits for multi-bit defences, the verifier's score for zero-bit ones. ``n`` =
    positives + negatives. Nothing is returned without positives or without negatives.
    """

    version = "1"
    higher_is_better = True

    @classmethod
    def outputs(cls, params, target_fprs):
        return ("auc",)

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        if _kind(ctx) is DetectionKind.BITS:
            pos, neg, k = _bits_data(ctx)
            what = f"score = matching bits of {k}"
        else:
            pos, neg = _scores(ctx.detection, "detection"), _scores(ctx.negatives, "negatives")
            what = "score = verifier score"
        if pos.size == 0 or neg.size == 0:
            return []
        est = stats.roc_auc(pos, neg, seed=_SEED)
        placements = stats.auc_placements(pos, neg)  # stored: several seeds combine by stats.hierarchical_auc
        return [_measurement("auc", est, higher_is_better=True, samples=placements.pos, samples_neg=placements.neg,
                             note=f"{pos.size} positives vs {neg.size} negatives; {what}; ties count half; "
                                  f"95% stratified bootstrap")]


def decisions(ctx: MeasureContext) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """Per target FPR, the verifier's decision on each image, as the ``tpr`` metric makes it: ``(label,
    detected_pos, detected_neg, rule)`` with bool arrays over the cell's images and negatives. Bits: the analytic
    threshold (label ``1e-06``); scores: the threshold set on the negatives (label ``fpr<=k/N``, each label once).
    Shared by the metrics that need per-image decisions (``forgery``, ``joint_evasion``)."""
    out = []
    if _kind(ctx) is DetectionKind.BITS:
        pos, neg, k = _bits_data(ctx)
        for fpr in ctx.target_fprs:
            tau = stats.bit_threshold(k, fpr)
            out.append((stats.analytic_fpr_label(fpr), pos >= tau, neg >= tau,
                        f"detected iff matches >= {tau} of {k} bits (analytic, target FPR {fpr:g})"))
        return out
    pos, neg = _scores(ctx.detection, "detection"), _scores(ctx.negatives, "negatives")
    if neg.size == 0:
        return out
    seen: set[str] = set()
    for fpr in ctx.target_fprs:
        label = stats.empirical_fpr_label(neg.size, fpr)
        if label in seen:
            continue
        seen.add(label)
        op = stats.tpr_at_fpr_scores(pos, neg, fpr)
        out.append((label, pos > op.threshold, neg > op.threshold,
                    f"detected iff score > {op.threshold:.6g} (set on {neg.size} negatives, target FPR {fpr:g})"))
    return out
