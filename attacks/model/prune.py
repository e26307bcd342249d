"""Weight pruning: unstructured (global or per-layer magnitude, random) and structured (output channels)."""

from __future__ import annotations

import torch

from markbench import model_attacks, ModelAttack, param
from markbench.weights import SCOPES, layer_weights


@model_attacks.register("prune")
class Prune(ModelAttack):
    """Zero a fraction ``sparsity`` of the weights of every Linear/Conv layer in ``scope``, without retraining.

    Methods (Han et al., NeurIPS 2015 for magnitude pruning; Li et al., ICLR 2017 for filter pruning):

    * ``global_magnitude``: the smallest |w| across all layers of the scope together;
    * ``layer_magnitude``: the smallest |w| within each layer (every layer at the same sparsity);
    * ``random``: a uniformly random fraction of each layer (drawn from the stage's generator);
    * ``structured``: whole output channels (rows / filters) with the smallest L2 norm, per layer.

    Biases and normalisation layers are kept. Ties at the threshold are broken by position so that exactly
    ``round(sparsity * n)`` weights are zeroed.
    """

    version = "1"
    goal = "compression"
    attacker_has = "the released watermarked weights only"
    resources = {"num_gpus": 0}  # a one-pass weight edit: a CPU worker is enough
    method: str = param("global_magnitude", "which weights go",
            choices=("global_magnitude", "layer_magnitude", "random", "structured"))
    sparsity: float = param(0.3, "fraction of weights (or channels) zeroed", low=0.0, high=1.0)
    scope: str = param("unet", "which component", choices=SCOPES)

    def apply(self, pipe, ctx):
        layers = list(layer_weights(pipe, self.scope))
        zeroed = total = 0
        with torch.no_grad():
            if self.method == "global_magnitude":
                flat = torch.cat([w.detach().abs().flatten().float() for _, _, w in layers])
                k = int(round(self.sparsity * flat.numel()))
                if k > 0:
                    order = torch.argsort(flat, stable=True)[:k]
                    mask = torch.ones_like(flat, dtype=torch.bool)
                    mask[order] = False
                    start = 0
                    for _, _, w in layers:
                        m = mask[start:start + w.numel()].view_as(w)
                        w.mul_(m.to(w.dtype))
                        start += w.numel()
            else:
                for _, _, w in layers:
                    self._prune_layer(w, ctx.generator)
            for _, _, w in layers:
                zeroed += int((w == 0).sum())
                total += w.numel()
        ctx.record_cost(steps=0, weights_zeroed=zeroed, weights_in_scope=total,
                        achieved_sparsity=zeroed / max(1, total))
        return pipe

    def _prune_layer(self, w: torch.Tensor, generator: torch.Generator) -> None:
        n = w.numel()
        if self.method == "structured":
            rows = w.shape[0]
            k = int(round(self.sparsity * rows))
            if k:
                norms = w.detach().reshape(rows, -1).float().norm(dim=1)
                w[torch.argsort(norms, stable=True)[:k]] = 0
            return
        k = int(round(self.sparsity * n))
        if not k:
            return
        if self.method == "layer_magnitude":
            idx = torch.argsort(w.detach().abs().flatten().float(), stable=True)[:k]
        else:  # random
            idx = torch.randperm(n, generator=generator)[:k].to(w.device)
        w.view(-1)[idx] = 0
