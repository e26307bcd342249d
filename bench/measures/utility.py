"""Attacker utility: what a model attack gave the attacker, on the watermarked model and on the clean model alike.

"The mark survives fine-tuning" means something only if the fine-tune did what the attacker wanted; "pruning removes
the mark" only at a stated quality. Stored with every model-attacked cell (nothing for the unattacked model):

Downstream fine-tunes (``goal = "downstream"`` with a recognisable dataset, :mod:`bench.downstream`: ``tiny:style``
and ``tiny:subject``). The planner generates the task's held-out captions (as many as the run's images, seed 1
captions, seeds of their own) with the attacked watermarked model, the equally attacked clean model and the
unattacked base; the dataset's world judges whether each image shows the new style or subject (the tiny world: its
CLIP, zero-shot):

* ``utility_downstream``: the share of the attacked *watermarked* model's images that show it (Clopper-Pearson);
* ``utility_downstream_clean``: the same for the equally attacked *clean* model;
* ``utility_downstream_base``: the unattacked base (the level before any fine-tune: what "learnt" is read against).

The held-out downstream loss (every model attack that trains on a downstream dataset: a world's task or a folder;
the attacked model's denoising loss on the task's held-out images, :func:`bench.downstream.heldout_loss`: the same
seeded noise and timesteps for every model, so the three values are paired image by image). Lower is more utility:
the model predicts the noise of the task's unseen images better.

* ``utility_heldout_loss`` / ``utility_heldout_loss_clean`` / ``utility_heldout_loss_base``: the attacked watermarked
  model, the equally attacked clean model, the unattacked base; ``utility_heldout_loss_start``: the unattacked
  watermarked model (where the attacked one started: a mark can cost held-out loss before any attack); mean over
  images, 95% t-interval.

Quality kept (every model attack; the attacker's whole goal for ``goal = "compression"``: pruning, quantisation):
the model's ordinary images (the run's captions and seeds, no trigger) against the unattacked clean base's images
for the same captions and seeds (``ctx.reference()``):

* ``utility_fid`` / ``utility_fid_clean``: FID (:mod:`bench.measures.fid`, default features, paired 95% jackknife)
  of the attacked watermarked / clean model;
* ``utility_clip_delta`` / ``utility_clip_delta_clean``: mean paired CLIP-score change
  (:mod:`bench.measures.clip_score`, the tiny CLIP by default), 95% t-interval.

Recognition, the held-out loss and the CLIP-score change store their per-image values (``Measurement.samples``: the 0/1 outcomes, the
paired changes), so that repeated attack runs (``[run] attack_seeds``) and run seeds combine by the hierarchical
bootstrap in the leaderboard and its utility curves, with an interval, as detection does. FID is a set statistic and
has none.

Every note says what the attack assumes the attacker has (``ModelAttack.attacker_has``) and flags an attack
stronger than the threat model (``merge(other=base)``: the attacker would need the owner's clean base).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from markbench import param, stats
from markbench.measures.clip_score import DEFAULT_CLIP_MODEL
from markbench.plugins import MeasureContext, Measurement, Metric
from markbench.registries import metrics


def _clean(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def threat_note(attack: Any) -> str:
    """What the attack assumes the attacker has, and whether that exceeds the threat model."""
    has = getattr(type(attack), "attacker_has", "") or "not stated"
    note = f"attack {attack.describe()}: the attacker has {has}"
    if attack.exceeds_threat_model():
        note += "; STRONGER THAN THE THREAT MODEL (an attacker of released weights lacks this)"
    return note


@metrics.register("attacker_utility")
class AttackerUtility(Metric):
    """What a model attack achieved for the attacker, on the watermarked and the equally attacked clean model:
    recognition of a fine-tune's new style or subject, and the quality kept (FID, CLIP-score change).

    Model-attacked cells only. Details in :mod:`bench.measures.utility`.
    """

    # 2: the tiny world's recognition requires the caption's content (noise no longer counts); 3: the held-out loss
    version = "4"
    needs_images = True
    higher_is_better = True
    clip_model: str = param(DEFAULT_CLIP_MODEL,
            "the CLIP of the CLIP-score change, as clip_score's model ('tiny-world' or an open_clip name)")
    clip_pretrained: str | None = param(None,
            "its weights, as clip_score's pretrained (default: the shipped tiny CLIP; 'random': for tests)")
    fid: bool = param(True, "compute the FID of the quality kept (about 0.13 s per image on a CPU)")
    smoke_params = {"clip_pretrained": "random", "fid": False}

    @classmethod
    def outputs(cls, params, target_fprs):
        names = ["utility_downstream", "utility_downstream_clean", "utility_downstream_base",
                 "utility_heldout_loss", "utility_heldout_loss_clean", "utility_heldout_loss_base",
                 "utility_heldout_loss_start",
                 "utility_clip_delta", "utility_clip_delta_clean"]
        if params.get("fid", True):
            names += ["utility_fid", "utility_fid_clean"]
        return tuple(names)

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        attack = ctx.model_attack
        if attack is None or getattr(type(attack), "identity", False):
            return []
        threat = threat_note(attack)
        return (self._downstream(ctx, attack, threat) + self._heldout_loss(ctx, attack, threat)
                + self._quality(ctx, threat))

    # -- the downstream task ---------------------------------------------------------------------------------
    def _downstream(self, ctx: MeasureContext, attack: Any, threat: str) -> list[Measurement]:
        from markbench.downstream import eval_captions, recognised, task_of

        task = task_of(attack.downstream_dataset(), attack.params.get("token"))
        roles = ("downstream_marked", "downstream_clean", "downstream_base")
        if task is None or not all(r in ctx.loaders for r in roles):
            return []
        out = []
        for role, name, who in zip(roles, ("utility_downstream", "utility_downstream_clean",
                                           "utility_downstream_base"),
                                   ("the attacked watermarked model", "the equally attacked clean model",
                                    "the unattacked clean base (before the attack)")):
            images = ctx.loaders[role]()
            hits = recognised(task, images, eval_captions(task, int(images.shape[0])))
            est = stats.rate(int(hits.sum()), int(hits.size))
            out.append(Measurement(
                name=name, value=est.value, low=_clean(est.low), high=_clean(est.high), n=est.n,
                higher_is_better=True, samples=tuple(float(h) for h in np.asarray(hits).ravel()),
                note=(f"share of {hits.size} images of {who} for held-out {task.dataset} captions in which the "
                      f"dataset's world recognises {task.description} (bench.downstream); exact Clopper-Pearson "
                      f"interval; {threat}")))
        return out

    # -- the held-out downstream loss ---------------------------------------------------------------------------
    def _heldout_loss(self, ctx: MeasureContext, attack: Any, threat: str) -> list[Measurement]:
        roles = ("heldout_loss_marked", "heldout_loss_clean", "heldout_loss_base")
        if not all(r in ctx.values for r in roles):
            return []
        dataset = attack.downstream_dataset()
        out = []
        start = ("heldout_loss_start",) if "heldout_loss_start" in ctx.values else ()
        for role, name, who in zip(roles + start, ("utility_heldout_loss", "utility_heldout_loss_clean",
                                                   "utility_heldout_loss_base", "utility_heldout_loss_start"),
                                   ("the attacked watermarked model", "the equally attacked clean model",
                                    "the unattacked clean base (before the attack)",
                                    "the unattacked watermarked model (its starting point)")):
            values = np.asarray(ctx.values[role](), dtype=float).ravel()
            if values.size == 0:  # a folder with no image beyond those the attack trains on: said, not silent
                out.append(Measurement(
                    name=name, value=math.nan, n=0, higher_is_better=False,
                    note=(f"no held-out loss of {who}: {dataset} has no held-out images (a folder's held-out "
                          f"split is the images after the ones the attack trains on); {threat}")))
                continue
            if not np.isfinite(values).all():  # a model broken to NaN / inf: no number, said in the note
                out.append(Measurement(
                    name=name, value=math.nan, n=int(values.size), higher_is_better=False,
                    note=(f"held-out loss of {who} on {dataset}: {int((~np.isfinite(values)).sum())} of "
                          f"{values.size} images give a non-finite loss (the model is broken); {threat}")))
                continue
            est = stats.mean_t_interval(values)
            out.append(Measurement(
                name=name, value=est.value, low=_clean(est.low), high=_clean(est.high), n=est.n,
                higher_is_better=False, samples=tuple(values.tolist()),
                note=(f"held-out loss (lower = more utility): mean denoising loss of {who} on {values.size} held-out "
                      f"images of {dataset} (the split the attack does not train on), at the same seeded noise and "
                      f"timesteps for every model (bench.downstream.heldout_loss); 95% t-interval; {threat}")))
        return out

    # -- the quality kept ------------------------------------------------------------------------------------
    def _quality(self, ctx: MeasureContext, threat: str) -> list[Measurement]:
        if "ordinary_marked" not in ctx.loaders or "reference" not in ctx.loaders:
            return []
        sets = (("", ctx.loaders["ordinary_marked"], "the attacked watermarked model's ordinary images"),
                ("_clean", ctx.clean_twins, "the equally attacked clean model's ordinary images"))
        out: list[Measurement] = []
        if self.params["fid"]:
            out += self._fid(ctx, sets, threat)
        if ctx.prompts:
            out += self._clip(ctx, sets, threat)
        return out

    def _fid(self, ctx: MeasureContext, sets, threat: str) -> list[Measurement]:
        from markbench.measures import fid as fid_mod

        plugin = metrics.get("fid")()
        ref, paired = plugin.reference_features(ctx)
        out = []
        for suffix, load, what in sets:
            x = plugin.image_features(load(), ctx)
            n = int(x.shape[0])
            if n < 2 or ref.shape[0] < 2:
                continue
            with fid_mod.single_thread():
                value = fid_mod.frechet_distance(x, ref)
            stat = plugin.jackknife_statistic(x, ref)
            pair = paired and ref.shape[0] == n
            se = (fid_mod.jackknife_se(lambda keep: stat(keep, keep), n) if pair else math.nan)
            low = high = None
            if math.isfinite(se):
                low, high = max(0.0, value - fid_mod.Z95 * se), value + fid_mod.Z95 * se
            out.append(Measurement(
                name=f"utility_fid{suffix}", value=float(value), low=low, high=high, n=n, higher_is_better=False,
                note=(f"quality kept: FID of {n} of {what} against the unattacked clean base's images (same "
                      f"captions and seeds); TF-FID Inception features; 95% paired jackknife; biased upward at "
                      f"small N; {threat}")))
        return out

    def _clip(self, ctx: MeasureContext, sets, threat: str) -> list[Measurement]:
        clip = metrics.get("clip_score")(model=self.params["clip_model"], pretrained=self.params["clip_pretrained"])
        ref = clip.reference_scores(ctx)
        out = []
        for suffix, load, what in sets:
            scores = clip.scores(load(), ctx)
            if scores.shape != ref.shape or scores.size == 0:
                continue
            delta = np.asarray(scores - ref, dtype=float).ravel()
            est = stats.mean_t_interval(delta)
            out.append(Measurement(
                name=f"utility_clip_delta{suffix}", value=est.value, low=_clean(est.low), high=_clean(est.high),
                n=est.n, higher_is_better=True, samples=tuple(delta.tolist()),
                note=(f"quality kept: mean CLIP-score change of {est.n} of {what} against the unattacked clean "
                      f"base's image for the same caption and seed (CLIP {self.params['clip_model']}); "
                      f"95% t-interval; {threat}")))
        return out
