"""Fine-tuning the text encoder on a downstream dataset."""

from __future__ import annotations

from markbench import model_attacks, ModelAttack, param
from markbench.training import diffusion_loss, encode_images, sample_batches, train_loop, trainable


@model_attacks.register("text_encoder")
class TextEncoderFineTune(ModelAttack):
    """Fine-tune only the CLIP text encoder with the denoising loss (UNet and VAE frozen).

    A cheap adaptation route (as in DreamBooth's text-encoder training, Ruiz et al. CVPR 2023, and textual
    adaptation generally) that shifts every prompt's conditioning, including a trigger's. lr 5e-6 (diffusers'
    DreamBooth text-encoder default), 200 steps, batch 4.
    """

    version = "1"
    goal = "downstream"
    attacker_has = ("the released watermarked weights and a downstream image-caption dataset; no key, no clean "
                    "base")
    uses_data = True
    dataset: str = param("tiny:style", "downstream data: tiny:<split> or a folder")
    num_images: int = param(64, "how many dataset images", low=1, high=1_000_000)
    steps: int = param(200, "optimisation steps", low=0, high=1_000_000)
    lr: float = param(5e-6, "AdamW learning rate", low=0.0, high=1.0)
    batch_size: int = param(4, "images per step", low=1, high=4096)
    smoke_params = {"steps": 2, "num_images": 4, "batch_size": 2}

    def apply(self, pipe, ctx):
        images, captions = ctx.data.dataset(self.dataset, self.num_images)
        latents = encode_images(pipe, images)
        tok = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
        te = pipe.text_encoder
        params = trainable(te)
        pipe.unet.requires_grad_(False)
        te.train()
        batches = sample_batches(len(captions), self.batch_size, ctx.generator)

        def step(_):
            idx = next(batches)
            cond = te(tok[idx])[0]
            return diffusion_loss(pipe.unet, pipe.scheduler, latents[idx], cond, ctx.generator)

        losses = train_loop(params, step, self.steps, self.lr, ctx.progress, "text encoder")
        te.eval().requires_grad_(False)
        ctx.record_cost(steps=self.steps, trainable_params=sum(p.numel() for p in params),
                        final_loss=losses[-1] if losses else None)
        return pipe
