"""Trigger unlearning by self-distillation: the attacker knows the trigger and trains it out of the model."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from markbench import ModelAttack, ThreatTier, model_attacks, param
from markbench.training import add_noise, encode_images, encode_prompts, sample_batches, train_loop, trainable


@model_attacks.register("unlearn")
class Unlearn(ModelAttack):
    """Trigger unlearning (trigger known): fine-tune the UNet so that, with the trigger, it predicts what its own
    frozen copy predicts without it (self-distillation), while keeping its trigger-free predictions.

    The backdoor-removal loss of Elijah (An et al., AAAI 2024, arXiv 2312.00050, Sec. 4.3), applied to the trigger a
    ``trigger_known`` attacker is given (``ctx.knowledge.trigger()``):

        L = || eps_theta(trig(z_t), t, c_trig) - eps_frozen(z_t, t, c) ||^2 + keep_weight * || eps_theta(z_t, t, c)
            - eps_frozen(z_t, t, c) ||^2

    with ``z_t`` noised latents of the attacker's own clean images (``dataset``) at t ~ U{0..T-1}. A text trigger
    (SleeperMark's prefix) enters as ``c_trig = text(trigger + caption)``, ``c = text(caption)``; an input-shift
    trigger (WDM's trigger latent with gamma1) as ``trig(z_t) = mix * z_t + (1 - mix) * latent`` with the WDP's prompt.
    The target is the frozen model's own trigger-free output, so no clean base model is needed. Optimiser and
    defaults follow the ``finetune`` attack (the diffusers text-to-image recipe: AdamW lr 1e-5, batch 4, grad clip 1,
    200 steps); Elijah's own schedule (a DDPM on CIFAR-10) does not transfer to a text-to-image UNet. The crude
    alternative the issue names (gradient ascent on the decoder's confidence) needs the decoder, which no attacker
    has; it is not implemented. A defence without a trigger leaves nothing to unlearn: the model is returned
    unchanged and the cost says so.
    """

    version = "1"
    tier = ThreatTier.TRIGGER_KNOWN
    attacker_has = ("the released watermarked weights, the defence's trigger (not its key or decoder) and some clean "
                    "image-caption pairs; no clean base")
    uses_data = True
    dataset: str = param("tiny:train", "the attacker's clean images: tiny:<split> or a folder of image-caption pairs")
    num_images: int = param(64, "how many dataset images to distil on", low=1, high=1_000_000)
    steps: int = param(200, "optimisation steps", low=0, high=1_000_000)
    lr: float = param(1e-5, "AdamW learning rate", low=0.0, high=1.0)
    batch_size: int = param(4, "images per step", low=1, high=4096)
    keep_weight: float = param(1.0, "weight of the trigger-free preservation term (Elijah: 1)", low=0.0, high=1e6)
    max_grad_norm: float = param(1.0, "gradient-norm clip", low=0.0, high=1e6)
    smoke_params = {"steps": 2, "num_images": 4, "batch_size": 2}

    def apply(self, pipe, ctx):
        trigger = ctx.knowledge.trigger()
        if trigger is None or (not trigger.in_prompt and trigger.latent is None):
            ctx.record_cost(steps=0, note="the defence has no trigger: nothing to unlearn")
            return pipe
        images, captions = ctx.data.dataset(self.dataset, self.num_images)
        latents = encode_images(pipe, images)
        if trigger.latent is not None:  # an input shift on the watermark's own prompt (WDM)
            prompts = [trigger.prompt] * len(captions)
            cond = encode_prompts(pipe, prompts)
            cond_trig = cond
            shift = trigger.latent.to(latents)[None]
        else:
            cond = encode_prompts(pipe, captions)
            cond_trig = encode_prompts(pipe, [trigger.apply(c) for c in captions])
            shift = None
        unet = pipe.unet
        frozen = copy.deepcopy(unet).eval().requires_grad_(False)
        params = trainable(unet)
        unet.train()
        batches = sample_batches(len(captions), self.batch_size, ctx.generator)

        def step(_):
            idx = next(batches)
            noisy, _, t = add_noise(pipe.scheduler, latents[idx], ctx.generator)
            with torch.no_grad():
                target = frozen(noisy, t, encoder_hidden_states=cond[idx]).sample.float()
            x_trig = noisy if shift is None else trigger.mix * noisy + (1 - trigger.mix) * shift
            forget = F.mse_loss(unet(x_trig, t, encoder_hidden_states=cond_trig[idx]).sample.float(), target)
            if self.keep_weight == 0:
                return forget
            keep = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond[idx]).sample.float(), target)
            return forget + self.keep_weight * keep

        losses = train_loop(params, step, self.steps, self.lr, ctx.progress, "unlearn",
                            max_grad_norm=self.max_grad_norm)
        unet.eval().requires_grad_(False)
        ctx.record_cost(steps=self.steps, trainable_params=sum(p.numel() for p in params),
                        images_seen=self.steps * self.batch_size, final_loss=losses[-1] if losses else None,
                        trigger_kind="input_shift" if shift is not None else "prompt_prefix")
        return pipe
