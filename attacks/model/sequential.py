"""Sequential fine-tuning on two downstream datasets, one after the other."""

from __future__ import annotations

from markbench import ModelAttack, model_attacks, param
from markbench.training import denoising_finetune, encode_images, encode_prompts, trainable


@model_attacks.register("sequential_finetune")
class SequentialFineTune(ModelAttack):
    """Full UNet fine-tuning on ``first`` and then on ``dataset`` (two adopters in a row, or one adopter's two
    projects): the sequential-fine-tune adversary of the model-persistence suite issue 29 names, and the continual
    fine-tuning under which a mark is forgotten as a task is (catastrophic forgetting, Kirkpatrick et al., PNAS 2017).

    Each phase is the ``finetune`` attack's recipe (Wang et al. CVPR 2025, Sec. 5; the diffusers text-to-image
    defaults: AdamW lr 1e-5, batch 4, weight decay 1e-2, grad clip 1) with its own optimiser, for ``steps`` steps
    each. The attacker's utility is read on the last dataset (``dataset``): what the model ends up able to do.
    """

    version = "1"
    goal = "downstream"
    attacker_has = ("the released watermarked weights and two downstream image-caption datasets; no key, no clean "
                    "base")
    uses_data = True
    first: str = param("tiny:style", "the first fine-tuning dataset")
    dataset: str = param("tiny:subject", "the second (last) dataset; utility is read on it")
    num_images: int = param(64, "images of each dataset", low=1, high=1_000_000)
    steps: int = param(200, "optimisation steps of each phase", low=0, high=1_000_000)
    lr: float = param(1e-5, "AdamW learning rate", low=0.0, high=1.0)
    batch_size: int = param(4, "images per step", low=1, high=4096)
    weight_decay: float = param(1e-2, "AdamW weight decay", low=0.0, high=1.0)
    max_grad_norm: float = param(1.0, "gradient-norm clip", low=0.0, high=1e6)
    smoke_params = {"steps": 1, "num_images": 4, "batch_size": 2}

    def apply(self, pipe, ctx):
        unet = pipe.unet
        finals = []
        for phase in (self.first, self.dataset):
            images, captions = ctx.data.dataset(phase, self.num_images)
            latents = encode_images(pipe, images)
            cond = encode_prompts(pipe, captions)
            losses = denoising_finetune(pipe, latents, cond, trainable(unet), ctx.generator, self.steps, self.lr,
                                        self.batch_size, ctx.progress, f"sequential_finetune {phase}",
                                        weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)
            finals.append(losses[-1] if losses else None)
        unet.eval().requires_grad_(False)
        ctx.record_cost(steps=2 * self.steps, images_seen=2 * self.steps * self.batch_size,
                        trainable_params=sum(p.numel() for p in unet.parameters()), final_losses=finals)
        return pipe
