"""LoRA fine-tuning with peft, merged into the weights."""

from __future__ import annotations

from markbench import ModelAttack, model_attacks, param
from markbench.training import diffusion_loss, encode_images, encode_prompts, sample_batches, train_loop


@model_attacks.register("lora")
class LoRAFineTune(ModelAttack):
    """LoRA fine-tuning of the UNet's attention projections (Hu et al., ICLR 2022), then merged into the weights.

    The attack under which SleeperMark (Wang et al., CVPR 2025) reports AquaLoRA and WDM failing: rank 20, 20 / 200 /
    2000 steps. Low-rank adapters ``W + (alpha / r) B A`` on ``to_q, to_k, to_v, to_out.0`` via peft; A random, B zero
    at the start; after training ``merge_and_unload`` leaves a plain UNet with changed weights (what a user would
    publish). lr 1e-4 and batch 4 follow the diffusers LoRA text-to-image recipe.
    """

    version = "1"
    goal = "downstream"
    attacker_has = ("the released watermarked weights and a downstream image-caption dataset; no key, no clean "
                    "base")
    uses_data = True
    dataset: str = param("tiny:style", "downstream data: tiny:<split> or a folder of image-caption pairs")
    num_images: int = param(64, "how many dataset images to train on", low=1, high=1_000_000)
    rank: int = param(20, "LoRA rank r", low=1, high=4096)
    alpha: float = param(20.0, "LoRA alpha (scale alpha / r)", low=0.0, high=1e6)
    target_modules: list[str] = param(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules to adapt")
    steps: int = param(200, "optimisation steps", low=0, high=1_000_000)
    lr: float = param(1e-4, "AdamW learning rate", low=0.0, high=1.0)
    batch_size: int = param(4, "images per step", low=1, high=4096)
    max_grad_norm: float = param(1.0, "gradient-norm clip", low=0.0, high=1e6)
    smoke_params = {"steps": 2, "num_images": 4, "batch_size": 2, "rank": 2}

    def apply(self, pipe, ctx):
        import torch
        from peft import LoraConfig, get_peft_model

        images, captions = ctx.data.dataset(self.dataset, self.num_images)
        latents = encode_images(pipe, images)
        cond = encode_prompts(pipe, captions)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                            init_lora_weights="gaussian", lora_dropout=0.0)
        unet = pipe.unet
        unet.requires_grad_(False)
        # peft draws A from the global RNG: draw it from ours instead (no global seeding in plugins)
        peft_model = get_peft_model(unet, config)
        params = []
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                if "lora_A" in name:
                    with torch.no_grad():
                        p.copy_(torch.randn(p.shape, generator=ctx.generator) / self.rank)
                p.requires_grad_(True)
                params.append(p)
        batches = sample_batches(len(captions), self.batch_size, ctx.generator)
        peft_model.train()

        def step(_):
            idx = next(batches)
            return diffusion_loss(unet, pipe.scheduler, latents[idx], cond[idx], ctx.generator)

        losses = train_loop(params, step, self.steps, self.lr, ctx.progress, "lora", weight_decay=0.0,
                            max_grad_norm=self.max_grad_norm)
        n_params = sum(p.numel() for p in params)
        pipe.unet = peft_model.merge_and_unload().eval().requires_grad_(False)
        ctx.record_cost(steps=self.steps, trainable_params=n_params, rank=self.rank,
                        final_loss=losses[-1] if losses else None)
        return pipe
