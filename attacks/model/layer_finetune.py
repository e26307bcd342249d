"""Fine-tuning restricted to the layers a watermarking method is known to train (threat tier: method known)."""

from __future__ import annotations

import re

from markbench import ThreatTier, model_attacks, param
from markbench.training import trainable

from .finetune import FineTune

#: The parameter sets an attacker who knows the method can target. ``up_attention``: every parameter of the UNet's
#: up-block transformers (the attention projections, their norms and feed-forwards: the modules SleeperMark's stage 2
#: trains, Wang et al., CVPR 2025, Sec. 4.2); ``up_blocks``: every up-block parameter.
LAYER_SETS = {
    "up_attention": r"^up_blocks\.\d+\.attentions\.",
    "up_blocks": r"^up_blocks\.",
}


@model_attacks.register("layer_finetune")
class LayerFineTune(FineTune):
    """Fine-tuning of only the layers that carry the mark, for an attacker who knows the watermarking method.

    Issue 29's tier 1 ("trigger unknown, method known"): SleeperMark publishes which modules its stage 2 fine-tunes
    (the up-block attention), so an adopter who wants the mark gone spends the whole fine-tuning budget there, with
    the standard denoising loss on a downstream dataset, as :class:`~attacks.model.finetune.FineTune` does for the
    whole UNet (the 2026 persistence study's "fine-tuning restricted to the watermark-carrying layers"). Everything but
    ``layers`` is ``finetune``'s, with its defaults (the diffusers recipe: lr 1e-5, batch 4, grad clip 1).
    """

    version = "1"
    tier = ThreatTier.METHOD_KNOWN
    attacker_has = ("the released watermarked weights, which layers the method trains (not its trigger, key or "
                    "clean base), and a downstream image-caption dataset")
    layers: str = param("up_attention", "which parameters train (the rest stay frozen)", choices=tuple(LAYER_SETS))

    progress_label = "layer_finetune"

    def trainable_parameters(self, unet) -> list:
        pattern = re.compile(LAYER_SETS[self.layers])
        names = [n for n, _ in unet.named_parameters() if pattern.match(n)]
        if not names:
            raise ValueError(f"layer_finetune: the UNet has no parameter in layers = {self.layers!r} "
                             f"(pattern {LAYER_SETS[self.layers]})")
        return trainable(unet, names)
