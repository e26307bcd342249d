"""Fine-tuning restricted to the layers a watermarking method is known to train (threat tier: method known)."""

from __future__ import annotations

import re

from markbench import ModelAttack, ThreatTier, model_attacks, param
from markbench.training import denoising_finetune, encode_images, encode_prompts, trainable

#: The parameter sets an attacker who knows the method can target. ``up_attention``: every parameter of the UNet's
#: up-block transformers (the attention projections, their norms and feed-forwards: the modules SleeperMark's stage 2
#: trains, Wang et al., CVPR 2025, Sec. 4.2); ``up_blocks``: every up-block parameter.
LAYER_SETS = {
    "up_attention": r"^up_blocks\.\d+\.attentions\.",
    "up_blocks": r"^up_blocks\.",
}


@model_attacks.register("layer_finetune")
class LayerFineTune(ModelAttack):
    """Fine-tuning of only the layers that carry the mark, for an attacker who knows the watermarking method.

    Issue 29's tier 1 ("trigger unknown, method known"): SleeperMark publishes which modules its stage 2 fine-tunes
    (the up-block attention), so an adopter who wants the mark gone spends the whole fine-tuning budget there, with
    the standard denoising loss on a downstream dataset, as ``finetune`` does for the
    whole UNet (the 2026 persistence study's "fine-tuning restricted to the watermark-carrying layers"). Everything but
    ``layers`` is ``finetune``'s, with its defaults (the diffusers recipe: lr 1e-5, batch 4, grad clip 1).
    """

    version = "1"
    goal = "downstream"
    uses_data = True
    tier = ThreatTier.METHOD_KNOWN
    attacker_has = ("the released watermarked weights, which layers the method trains (not its trigger, key or "
                    "clean base), and a downstream image-caption dataset")
    layers: str = param("up_attention", "which parameters train (the rest stay frozen)", choices=tuple(LAYER_SETS))
    # A deliberate copy of finetune's parameter declarations and defaults (the diffusers recipe): the plugin scan
    # reads each plugin class on its own, without importing it, so they cannot be inherited
    dataset: str = param("tiny:style", "downstream data: tiny:<split> or a folder of image-caption pairs")
    num_images: int = param(64, "how many dataset images to train on", low=1, high=1_000_000)
    steps: int = param(200, "optimisation steps", low=0, high=1_000_000)
    lr: float = param(1e-5, "AdamW learning rate", low=0.0, high=1.0)
    batch_size: int = param(4, "images per step", low=1, high=4096)
    weight_decay: float = param(1e-2, "AdamW weight decay", low=0.0, high=1.0)
    max_grad_norm: float = param(1.0, "gradient-norm clip", low=0.0, high=1e6)
    smoke_params = {"steps": 2, "num_images": 4, "batch_size": 2}

    def apply(self, pipe, ctx):
        images, captions = ctx.data.dataset(self.dataset, self.num_images)
        latents = encode_images(pipe, images)
        cond = encode_prompts(pipe, captions)
        unet = pipe.unet
        pattern = re.compile(LAYER_SETS[self.layers])
        names = [n for n, _ in unet.named_parameters() if pattern.match(n)]
        if not names:
            raise ValueError(f"layer_finetune: the UNet has no parameter in layers = {self.layers!r} "
                             f"(pattern {LAYER_SETS[self.layers]})")
        params = trainable(unet, names)
        losses = denoising_finetune(pipe, latents, cond, params, ctx.generator, self.steps, self.lr, self.batch_size,
                                    ctx.progress, "layer_finetune", weight_decay=self.weight_decay,
                                    max_grad_norm=self.max_grad_norm)
        unet.eval().requires_grad_(False)
        ctx.record_cost(steps=self.steps, trainable_params=sum(p.numel() for p in params),
                        images_seen=self.steps * self.batch_size, final_loss=losses[-1] if losses else None)
        return pipe
