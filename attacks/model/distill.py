"""Distillation: the released UNet's behaviour copied into a student the attacker initialises itself."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from markbench import ModelAttack, model_attacks, param
from markbench.training import add_noise, drop_to_empty, encode_images, prompt_embeds, sample_batches, train_loop

_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)


def reinitialise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter of ``module`` drawn afresh from ``generator`` (no global RNG): normalisation layers to unit
    scale and zero shift, other weights Kaiming-uniform (``a = sqrt(5)``, PyTorch's default for linear and conv
    layers), biases and 1-d parameters to zero. The architecture is kept; nothing of the old weights is."""
    norm_params = {id(p) for m in module.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in norm_params:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() > 1:
                torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5, generator=generator)
            else:
                p.zero_()


@model_attacks.register("distill")
class Distill(ModelAttack):
    """Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015) of the
    released UNet (the teacher) into a student: the student regresses the teacher's prediction at noised latents of
    the attacker's own captioned images,

        ``min E_{x, c, t, eps} || eps_S(z_t, t, c') - eps_T(z_t, t, c') ||^2``,  ``z_t = sqrt(a_t) E(x) + sqrt(1-a_t) eps``,

    ``t ~ U{0..T-1}``, ``c'`` the caption's embedding, replaced by the empty prompt's with probability
    ``uncond_prob`` (so the student also learns the unconditional branch that classifier-free guidance uses).
    ``init = "random"`` is the fresh student of model-persistence studies: the teacher's architecture, re-initialised
    from the attack's generator (:func:`reinitialise`). ``init = "teacher"`` starts from the teacher's own weights
    (self-distillation: a fine-tune towards the teacher's outputs, the weakest form). The teacher is queried only at
    inputs the attacker chooses, without a trigger it does not know, so a mark that only the trigger activates is
    never shown to the student: what is measured is whether the mark transfers anyway, and what the student's
    quality costs (FID and CLIP score against the clean base, as for every model attack).

    Defaults: AdamW lr 1e-4 (the SD fine-tuning rate), batch 8, 2000 steps, 256 images of ``tiny:train``; a bounded
    budget at tiny scale (a student from scratch needs far more steps to match its teacher: the quality numbers say
    how far it got).
    """

    version = "1"
    goal = ""
    attacker_has = ("the released watermarked weights (queried as a teacher) and captioned images of its own; no key, "
                    "no trigger, no clean base")
    uses_data = True
    init: str = param("random", "the student's start: 'random' (a fresh student, the teacher's architecture "
                      "re-initialised) or 'teacher' (self-distillation from the teacher's weights)",
                      choices=("random", "teacher"))
    dataset: str = param("tiny:train", "the attacker's captioned images: tiny:<split> or a folder")
    num_images: int = param(256, "how many images (and captions)", low=1, high=1_000_000)
    steps: int = param(2000, "optimisation steps", low=0, high=10_000_000)
    lr: float = param(1e-4, "AdamW learning rate", low=0.0, high=1.0)
    batch_size: int = param(8, "latents per step", low=1, high=4096)
    uncond_prob: float = param(0.1, "share of captions replaced by the empty prompt (caption dropout)", low=0.0,
                               high=1.0)
    smoke_params = {"steps": 2, "num_images": 4, "batch_size": 2}

    def apply(self, pipe, ctx):
        images, captions = ctx.data.dataset(self.dataset, self.num_images)
        teacher = pipe.unet
        device = teacher.device
        latents = encode_images(pipe, images)
        cond = prompt_embeds(pipe, captions, device)
        empty = prompt_embeds(pipe, [""], device)
        student = copy.deepcopy(teacher)
        if self.init == "random":
            reinitialise(student, ctx.generator)
        teacher.eval().requires_grad_(False)
        student.train().requires_grad_(True)
        params = list(student.parameters())
        batches = sample_batches(len(captions), self.batch_size, ctx.generator)

        def step(_):
            idx = next(batches)
            z = latents[idx]
            c = drop_to_empty(cond[idx], empty, self.uncond_prob, ctx.generator).to(device=device, dtype=z.dtype)
            noisy, _, t = add_noise(pipe.scheduler, z, ctx.generator)
            with torch.no_grad():
                target = teacher(noisy, t, encoder_hidden_states=c).sample
            pred = student(noisy, t, encoder_hidden_states=c).sample
            return F.mse_loss(pred.float(), target.float())

        losses = train_loop(params, step, self.steps, self.lr, ctx.progress, "distill")
        student.eval().requires_grad_(False)
        pipe.unet = student
        ctx.record_cost(steps=self.steps, trainable_params=sum(p.numel() for p in params),
                        teacher_queries=self.steps * self.batch_size,
                        final_loss=losses[-1] if losses else None)
        return pipe
