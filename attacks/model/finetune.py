"""Full fine-tuning of the UNet on a downstream dataset."""

from __future__ import annotations


from markbench import ModelAttack, model_attacks, param
from markbench.training import denoising_finetune, encode_images, encode_prompts, trainable


@model_attacks.register("finetune")
class FineTune(ModelAttack):
    """Full UNet fine-tuning on a downstream dataset with the standard denoising loss.

    The attack SleeperMark (Wang et al., CVPR 2025, arXiv 2412.04852, Sec. 5) and AquaLoRA (Feng et al., ICML 2024)
    evaluate: an adopter of the watermarked model fine-tunes it on their own data (a new style or subject). Every
    UNet parameter trains; VAE and text encoder stay frozen; eps-prediction MSE at t ~ U{0..T-1} (Ho et al. 2020),
    AdamW. Defaults follow the diffusers text-to-image fine-tuning recipe (lr 1e-5, batch 4, grad clip 1); the
    SleeperMark paper sweeps 20 / 200 / 2000 steps. ``dataset``: ``tiny:style``, ``tiny:subject`` or a folder of
    image-caption pairs (:mod:`bench.data`).
    """

    version = "1"
    goal = "downstream"
    attacker_has = ("the released watermarked weights and a downstream image-caption dataset; no key, no clean "
                    "base")
    uses_data = True
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
        params = trainable(unet)
        losses = denoising_finetune(pipe, latents, cond, params, ctx.generator, self.steps, self.lr, self.batch_size,
                                    ctx.progress, "finetune", weight_decay=self.weight_decay,
                                    max_grad_norm=self.max_grad_norm)
        unet.eval().requires_grad_(False)
        ctx.record_cost(steps=self.steps, trainable_params=sum(p.numel() for p in params),
                        images_seen=self.steps * self.batch_size, final_loss=losses[-1] if losses else None)
        return pipe
