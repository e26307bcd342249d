"""Fine-pruning: prune the units of the watermark-carrying layers that clean prompts leave dormant, then recover."""

from __future__ import annotations

import re

import torch

from markbench import ModelAttack, ThreatTier, model_attacks, param
from markbench.training import diffusion_loss, encode_images, encode_prompts, sample_batches, train_loop, trainable

#: The feed-forward output projections of the UNet's up-block transformers (the layers SleeperMark fine-tunes, with
#: the attention projections): a unit is one hidden feature of the feed-forward, i.e. one input column of ``ff.net.2``.
UP_BLOCK_FF = r"^up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.ff\.net\.2$"
ALL_FF = r"^(down_blocks|mid_block|up_blocks).*transformer_blocks\.\d+\.ff\.net\.2$"


@model_attacks.register("fine_prune")
class FinePrune(ModelAttack):
    """Fine-pruning (Liu, Dolan-Gavitt and Garg, RAID 2018, arXiv 1805.12185): rank the units of the layers where a
    backdoor lives by their mean activation on clean inputs, prune the most dormant ``fraction`` of them, then
    fine-tune on clean data to recover.

    Method known, trigger unknown: the attacker knows SleeperMark fine-tunes only the up-block attention modules
    (Wang et al., CVPR 2025, Sec. 4.2), so ``layers = "up_attention"`` ranks the hidden units of their feed-forward
    networks (``up_blocks.*.attentions.*.transformer_blocks.*.ff.net.2``'s input features; ``"all_attention"``: every
    block's). Activations are averaged over denoising forward passes of the attacker's clean images and captions
    (``dataset``) at t ~ U{0..T-1}; a pruned unit's column of ``ff.net.2`` is zeroed and stays zero during the
    recovery (its gradient is masked; AdamW then leaves it at zero). The paper prunes the last convolutional layer
    in increasing order of activation until clean accuracy drops by 4 %, then fine-tunes; a diffusion UNet has no
    accuracy to watch, so the pruned ``fraction`` is a parameter (default 0.3), and the recovery is the ``finetune``
    attack's recipe on clean data (AdamW lr 1e-5, batch 4, all UNet weights, ``recover_steps``).
    """

    version = "1"
    tier = ThreatTier.METHOD_KNOWN
    attacker_has = ("the released watermarked weights, which layers the method trains (not its trigger, key or "
                    "decoder) and some clean image-caption pairs")
    uses_data = True
    layers: str = param("up_attention", "whose feed-forward units are ranked and pruned",
            choices=("up_attention", "all_attention"))
    fraction: float = param(0.3, "share of the units pruned (the most dormant on clean inputs)", low=0.0, high=1.0)
    dataset: str = param("tiny:train", "clean images and captions: ranking and recovery")
    num_images: int = param(64, "how many dataset images", low=1, high=1_000_000)
    rank_batches: int = param(8, "forward passes (of batch_size images) that rank the units", low=1, high=100_000)
    recover_steps: int = param(100, "recovery fine-tuning steps (0: prune only)", low=0, high=1_000_000)
    lr: float = param(1e-5, "AdamW learning rate of the recovery", low=0.0, high=1.0)
    batch_size: int = param(4, "images per step", low=1, high=4096)
    smoke_params = {"recover_steps": 2, "num_images": 4, "batch_size": 2, "rank_batches": 1}

    def apply(self, pipe, ctx):
        unet = pipe.unet
        pattern = re.compile(UP_BLOCK_FF if self.layers == "up_attention" else ALL_FF)
        layers = {n: m for n, m in unet.named_modules() if pattern.match(n) and isinstance(m, torch.nn.Linear)}
        images, captions = ctx.data.dataset(self.dataset, self.num_images)
        latents = encode_images(pipe, images)
        cond = encode_prompts(pipe, captions)
        batches = sample_batches(len(captions), self.batch_size, ctx.generator)
        sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}
        counts = {n: 0 for n in layers}

        def hook(name):
            def record(module, args):
                x = args[0].detach().double()
                sums[name] += x.reshape(-1, x.shape[-1]).sum(0).cpu()
                counts[name] += x.reshape(-1, x.shape[-1]).shape[0]
            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        try:
            with torch.no_grad():
                for _ in range(self.rank_batches):
                    idx = next(batches)
                    diffusion_loss(unet, pipe.scheduler, latents[idx], cond[idx], ctx.generator)
        finally:
            for h in handles:
                h.remove()
        # one global ranking of every unit of the chosen layers by its mean activation (dormant first)
        names = list(layers)
        means = torch.cat([sums[n] / max(1, counts[n]) for n in names])
        owner = torch.cat([torch.full((layers[n].in_features,), i) for i, n in enumerate(names)])
        unit = torch.cat([torch.arange(layers[n].in_features) for n in names])
        k = int(round(self.fraction * means.numel()))
        pruned = torch.argsort(means, stable=True)[:k]
        masks = {n: torch.ones(layers[n].in_features, dtype=torch.bool) for n in names}
        for j in pruned.tolist():
            masks[names[int(owner[j])]][int(unit[j])] = False
        with torch.no_grad():
            for n in names:
                w = layers[n].weight
                w.mul_(masks[n].to(w.device, w.dtype)[None, :])
        losses: list[float] = []
        if self.recover_steps:
            params = trainable(unet)
            mask_handles = [layers[n].weight.register_hook(
                lambda g, m=masks[n]: g * m.to(g.device, g.dtype)[None, :]) for n in names]
            unet.train()

            def step(_):
                idx = next(batches)
                return diffusion_loss(unet, pipe.scheduler, latents[idx], cond[idx], ctx.generator)

            try:
                losses = train_loop(params, step, self.recover_steps, self.lr, ctx.progress, "fine_prune recovery",
                                    weight_decay=0.0)
            finally:
                for h in mask_handles:
                    h.remove()
        unet.eval().requires_grad_(False)
        ctx.record_cost(steps=self.recover_steps, units_pruned=k, units_ranked=int(means.numel()),
                        layers_pruned=len(names), final_loss=losses[-1] if losses else None)
        return pipe
