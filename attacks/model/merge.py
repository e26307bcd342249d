"""Model merging: interpolate the weights with the clean base or with an independently fine-tuned model."""

from __future__ import annotations

import torch

from markbench import ModelAttack, model_attacks, param


@model_attacks.register("merge")
class Merge(ModelAttack):
    """Weight interpolation ``W = (1 - alpha) * W_marked + alpha * W_other`` over every floating-point tensor of
    ``components`` (linear mode connectivity / "model soups", Wortsman et al. ICML 2022).

    ``other = "base"``: the clean, unwatermarked base model (an attacker who has the public base the owner started
    from). ``other = "finetuned"``: the clean base fine-tuned independently on ``dataset`` with the ``finetune``
    attack's recipe for ``steps`` steps (an attacker merging with a community fine-tune). ``other = "marked"``: a
    second release of the model watermarked by the same defence with an independent key (the model-persistence
    suite's merge of two independently watermarked models; the harness embeds it as its own stage,
    ``ctx.data.second_marked_model()``): does either key survive the average of the two?
    """

    version = "1"
    goal = ""
    attacker_has = ("the released watermarked weights and another model. other = 'finetuned' (the realistic "
                    "attack): a model fine-tuned independently (here the finetune recipe on the public clean base, "
                    "standing for a community fine-tune); other = 'base': the owner's clean base model itself, which "
                    "an attacker of released weights does not have: stronger than the threat model; other = "
                    "'marked': a second release watermarked by the same method with another key (two marked models, "
                    "no key)")
    beyond_threat_model = {"other": "base"}
    uses_data = True
    other: str = param("base", "the model merged in", choices=("base", "finetuned", "marked"))
    alpha: float = param(0.5, "weight of the other model", low=0.0, high=1.0)
    components: list[str] = param(["unet"], "components merged", choices=("unet", "text_encoder", "vae"))
    dataset: str = param("tiny:style", "for other = finetuned: its fine-tuning data")
    steps: int = param(200, "for other = finetuned: its fine-tuning steps", low=0, high=1_000_000)
    lr: float = param(1e-5, "for other = finetuned: its learning rate (the finetune attack's default)", low=0.0,
            high=1.0)
    num_images: int = param(64, "for other = finetuned: its dataset size", low=1, high=1_000_000)
    batch_size: int = param(4, "for other = finetuned: its batch size", low=1, high=4096)
    smoke_params = {"other": "finetuned", "steps": 1, "num_images": 2, "batch_size": 2}

    def uses_second_marked_model(self) -> bool:
        return self.other == "marked"

    def apply(self, pipe, ctx):
        other = ctx.data.second_marked_model() if self.other == "marked" else ctx.data.base_pipeline()
        if self.other == "finetuned":
            from markbench.attacks.model.finetune import FineTune

            FineTune(dataset=self.dataset, steps=self.steps, num_images=self.num_images, lr=self.lr,
                     batch_size=self.batch_size).apply(other, ctx)
        with torch.no_grad():
            for comp in self.components:
                mine, theirs = getattr(pipe, comp).state_dict(), getattr(other, comp).state_dict()
                for key, t in mine.items():
                    if t.is_floating_point():
                        t.lerp_(theirs[key].to(t), self.alpha)
        ctx.record_cost(steps=self.steps if self.other == "finetuned" else 0)
        return pipe
