"""Attention reset: re-initialise the cross-attention keys and values, then fine-tune them back."""

from __future__ import annotations

import math
import re

import torch

from markbench import ModelAttack, model_attacks, param
from markbench.rng import sub_generator
from markbench.training import denoising_finetune, encode_images, encode_prompts, trainable

_SCOPES = {"up": r"^up_blocks\.", "all": r"^(down_blocks|mid_block|up_blocks)\."}


@model_attacks.register("attention_reset")
class AttentionReset(ModelAttack):
    """Re-initialise the cross-attention key and value projections (``attn2.to_k``, ``attn2.to_v``) of the UNet's
    transformer blocks, then fine-tune the UNet on clean data so that it relearns how to read the prompt.

    One of the adversaries of the model-persistence suite issue 29 asks parity with (attention reset: re-initialise
    cross-attention K/V, then fine-tune); the K/V of cross-attention are where text conditioning, and so a text
    trigger, enters the UNet (Hertz et al., Prompt-to-Prompt, ICLR 2023, Sec. 3). Re-initialisation is PyTorch's
    ``nn.Linear`` default (Kaiming-uniform with a = sqrt(5), He et al. 2015), drawn from the stage's generator;
    ``scope = "up"`` resets only the up blocks (where SleeperMark trains), ``"all"`` every block. The recovery is the
    ``finetune`` attack's recipe (AdamW lr 1e-5, batch 4, grad clip 1) on ``dataset`` for ``steps`` steps, every UNet
    weight trainable (``train = "all"``) or only the reset projections (``"reset"``).
    """

    version = "1"
    attacker_has = "the released watermarked weights and some clean image-caption pairs; no key, no clean base"
    uses_data = True
    scope: str = param("all", "which blocks' cross-attention K/V are reset", choices=("up", "all"))
    train: str = param("all", "what the recovery trains", choices=("all", "reset"))
    dataset: str = param("tiny:train", "recovery data: tiny:<split> or a folder of image-caption pairs")
    num_images: int = param(64, "how many dataset images", low=1, high=1_000_000)
    steps: int = param(200, "recovery fine-tuning steps", low=0, high=1_000_000)
    lr: float = param(1e-5, "AdamW learning rate", low=0.0, high=1.0)
    batch_size: int = param(4, "images per step", low=1, high=4096)
    smoke_params = {"steps": 2, "num_images": 4, "batch_size": 2}

    def apply(self, pipe, ctx):
        unet = pipe.unet
        scope = re.compile(_SCOPES[self.scope] + r".*attn2\.(to_k|to_v)$")
        reset = {n: m for n, m in unet.named_modules() if scope.match(n) and isinstance(m, torch.nn.Linear)}
        gen = sub_generator(ctx.generator)
        with torch.no_grad():
            for m in reset.values():
                bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)) of nn.Linear.reset_parameters
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound)
                if m.bias is not None:
                    m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)
        losses: list[float] = []
        if self.steps:
            images, captions = ctx.data.dataset(self.dataset, self.num_images)
            latents = encode_images(pipe, images)
            cond = encode_prompts(pipe, captions)
            names = None if self.train == "all" else {f"{n}.{p}" for n, m in reset.items()
                                                     for p, _ in m.named_parameters()}
            losses = denoising_finetune(pipe, latents, cond, trainable(unet, names), ctx.generator, self.steps,
                                        self.lr, self.batch_size, ctx.progress, "attention_reset")
        unet.eval().requires_grad_(False)
        ctx.record_cost(steps=self.steps, layers_reset=len(reset), final_loss=losses[-1] if losses else None)
        return pipe
