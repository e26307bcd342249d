"""Resample: the holder of released weights samples them with the standard sampler."""

from __future__ import annotations

from markbench import ModelAttack, model_attacks


@model_attacks.register("resample")
class Resample(ModelAttack):
    """Sample the released weights with the model's standard sampler (fresh Gaussian initial noise, no key).

    The attack a sampling-time watermark (Tree-Ring, Gaussian Shading: ``MarkLocation.INITIAL_NOISE``) meets as
    soon as its weights are released: nothing in the weights carries the mark, so whoever holds them generates
    unmarked images by sampling normally. The weights are left unchanged (zero training steps); the planner gives
    initial-noise defences the standard generation under this attack instead of their keyed one
    (``standard_sampling``). For a defence whose mark lives in the weights it is the identity on the model.
    Origin: the threat-model argument of Tree-Ring (Wen et al. 2023, Sec. 5: the mark protects API-served models)
    and Gaussian Shading (Yang et al. 2024), measured here as an attack.
    """

    version = "1"
    standard_sampling = True
    attacker_has = "the released weights (it samples them with the standard sampler, without the owner's key)"
    goal = ""

    def apply(self, pipe, ctx):
        ctx.record_cost(steps=0, trainable_params=0)
        return pipe
