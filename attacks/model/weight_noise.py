"""Gaussian noise on the weights, relative to each tensor's scale."""

from __future__ import annotations

import torch

from markbench import model_attacks, ModelAttack, param
from markbench.weights import SCOPES, layer_weights


@model_attacks.register("weight_noise")
class WeightNoise(ModelAttack):
    """Add ``N(0, (sigma * std(W))^2)`` to every Linear/Conv weight W of ``scope`` (noise relative to each tensor's
    own spread, so layers of any scale are perturbed alike), drawn from the stage's generator. A blunt
    robustness probe used in model-watermark studies (e.g. Uchida et al., ICMR 2017, for embedded DNN marks)."""

    version = "1"
    goal = ""
    attacker_has = "the released watermarked weights only"
    resources = {"num_gpus": 0}  # a one-pass weight edit: a CPU worker is enough
    sigma: float = param(0.05, "noise std as a fraction of each tensor's std", low=0.0, high=10.0)
    scope: str = param("unet", "which component", choices=SCOPES)

    def apply(self, pipe, ctx):
        with torch.no_grad():
            for _, _, w in layer_weights(pipe, self.scope):
                std = w.detach().float().std() if w.numel() > 1 else w.detach().float().abs()
                noise = torch.randn(w.shape, generator=ctx.generator).to(w.device) * (self.sigma * std)
                w.add_(noise.to(w.dtype))
        ctx.record_cost(steps=0)
        return pipe
