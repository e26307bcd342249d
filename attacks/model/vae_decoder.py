"""Fine-tuning the VAE decoder on clean images (the known attack on Stable Signature)."""

from __future__ import annotations

import torch

from markbench import model_attacks, ModelAttack, param
from markbench.training import sample_batches, train_loop, trainable


@model_attacks.register("vae_decoder")
class VAEDecoderFineTune(ModelAttack):
    """Fine-tune only the VAE decoder to reconstruct clean images: ``min ||D(E(x)) - x||^2`` over clean x.

    Fernandez et al. (Stable Signature, ICCV 2023, Sec. 6) show that fine-tuning the latent decoder removes a mark
    that lives in the decoder's weights. The encoder is frozen, so the latent space (and everything the UNet
    produces) is unchanged; only the decoder forgets its mark. Loss: pixel MSE on clean images (``dataset``) at the
    encoder's posterior mean; AdamW lr 1e-4, 200 steps, batch 4.
    """

    version = "1"
    goal = ""
    attacker_has = "the released watermarked weights and clean images (no captions needed); no key, no clean base"
    uses_data = True
    dataset: str = param("tiny:train", "clean images: tiny:<split> or a folder")
    num_images: int = param(64, "how many clean images", low=1, high=1_000_000)
    steps: int = param(200, "optimisation steps", low=0, high=1_000_000)
    lr: float = param(1e-4, "AdamW learning rate", low=0.0, high=1.0)
    batch_size: int = param(4, "images per step", low=1, high=4096)
    smoke_params = {"steps": 2, "num_images": 4, "batch_size": 2}

    def apply(self, pipe, ctx):
        images, _ = ctx.data.dataset(self.dataset, self.num_images)
        vae = pipe.vae
        x = (images * 2 - 1).to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        vae.requires_grad_(False)
        params = trainable(vae.decoder) + (trainable(vae.post_quant_conv) if vae.post_quant_conv is not None else [])
        vae.train()
        batches = sample_batches(len(images), self.batch_size, ctx.generator)

        def step(_):
            idx = next(batches)
            return torch.nn.functional.mse_loss(vae.decode(z[idx]).sample.float(), x[idx].float())

        losses = train_loop(params, step, self.steps, self.lr, ctx.progress, "vae decoder")
        vae.eval().requires_grad_(False)
        ctx.record_cost(steps=self.steps, trainable_params=sum(p.numel() for p in params),
                        final_loss=losses[-1] if losses else None)
        return pipe
