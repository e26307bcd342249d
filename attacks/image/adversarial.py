"""Adversarial embedding attack (WAVES): a PGD perturbation that moves the image's embedding away from its own,
under an encoder the attacker has (grey-box: the generator's own VAE encoder; black-box: another VAE's encoder or a
CLIP image tower)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from markbench import AttackContext, ConfigError, image_attacks, ImageAttack, param
from markbench.latents import to_latent
from markbench.models import BASE, load_vae, vae_source

#: the ``encoder`` value that selects the image tower of the CLIP scorer ``clip_model``
CLIP = "clip"


@image_attacks.register("adv_embedding")
class AdvEmbedding(ImageAttack):
    """Adversarial embedding attack: L-infinity PGD pushing the image's embedding under an encoder away from the
    original's.

    WAVES (An et al., ICML 2024, "WAVES: Benchmarking the Robustness of Image Watermarks"), "AdvEmbG-KLVAE8" (grey
    box) and "AdvEmbB-*" (black box): maximise ``|| E(x + delta) - E(x) ||^2`` over ``||delta||_inf <= eps`` with
    projected gradient ascent (Madry et al., ICLR 2018), where E is an encoder the attacker has. ``encoder`` picks it:

    * ``"base"`` (grey-box, the default): the base pipeline's own VAE encoder (``needs_model = "base"``), the encoder
      a latent watermark is read through; E is the posterior mean in the scaled latent space
      (:func:`bench.latents.to_latent`).
    * a VAE the defender never saw (black-box): a shipped attacker autoencoder (the tiny world's ``tiny-vae-ind``,
      trained independently of tiny-sd), a built-in model's VAE or a VAE folder (:func:`bench.models.vae_source`);
      E as above, in that VAE's own scaled latent space.
    * ``"clip"`` (black-box): the image tower of the CLIP scorer ``clip_model`` (``"tiny-world"``: the tiny world's
      CLIP, WAVES' AdvEmbB-CLIP in spirit); E is the L2-normalised image embedding after the scorer's preprocessing,
      so the loss is ``2 - 2 cos``.

    PGD: a uniform random start in the eps-ball (from the stage's generator), ``steps`` signed-gradient steps of
    size ``step_size * eps``, each followed by projection onto the eps-ball and [0, 1]. The result is rounded to the
    8-bit grid *toward the input* (``x + trunc(255 delta) / 255``), so the L-infinity bound holds exactly on what is
    stored. The number of steps and the step size are this implementation's (Madry et al.'s rule of a total path of
    about 2.5 eps); the eps range is WAVES'.

    Strength mapping (WAVES' budget range 2/255 to 8/255): ``eps = (2 + 6 s) / 255``; default (s = 0.5) 5/255.
    """

    version = "1"
    needs_model = "base"
    strength_mapping = "eps = (2 + 6 s) / 255"
    zero_strength_tolerance = 2.0 / 255
    smoke_params = {"steps": 3}
    eps: float = param(5.0 / 255, "L-infinity budget (image range [0, 1])", low=0.0, high=1.0)
    steps: int = param(50, "PGD iterations", low=1, high=10000)
    step_size: float = param(0.05, "each step's size as a fraction of eps", low=0.0, high=1.0)
    random_start: bool = param(True, "start from a uniform random point of the eps-ball")
    batch_size: int = param(16, "images attacked at once", low=1, high=1024)
    encoder: str = param(BASE, "the encoder attacked: 'base' (grey-box: the base model's VAE encoder), 'clip' (the "
            "image tower of clip_model), or another VAE's encoder: a shipped attacker autoencoder (e.g. "
            "'tiny-vae-ind'), a built-in model (e.g. 'tiny-sd-rt') or a VAE folder", keyed_at_default=False,
            names_model="vae")
    clip_model: str = param("tiny-world", "with encoder = 'clip': the CLIP scorer whose image tower is attacked "
            "(clip_score's model: 'tiny-world', a world's scorer, or an open_clip architecture)",
            keyed_at_default=False, names_model="clip")

    def __init__(self, **given: Any):
        super().__init__(**given)
        if self.encoder != CLIP:
            vae_source(self.encoder, "adv_embedding.encoder")  # a name or folder that is none: refused here
        else:
            from markbench.world import world_for_clip_model

            if world_for_clip_model(self.clip_model) is None and not self.clip_model.startswith(("hf-hub:",
                                                                                                  "local-dir:")):
                raise ConfigError(f"adv_embedding.clip_model = {self.clip_model!r} is neither a world's CLIP scorer "
                                  f"nor an 'hf-hub:' / 'local-dir:' open_clip model: a bare architecture name would "
                                  f"be a randomly initialised network, not a CLIP the attacker has")

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"eps": (2.0 + 6.0 * s) / 255.0}

    def named_models(self) -> dict[str, tuple[str, str]]:
        # the CLIP scorer's weights are loaded only when the encoder is 'clip'; otherwise the encoder names a VAE
        if self.encoder == CLIP:
            return {"clip_model": ("clip", self.clip_model)}
        return {"encoder": ("vae", self.encoder)} if self.encoder != BASE else {}

    def embedding(self, ctx: AttackContext) -> Callable[[torch.Tensor], torch.Tensor]:
        """``E``: float images ``[N, 3, H, W]`` in [0, 1] on ``ctx.device`` -> the embedding PGD moves (float32),
        differentiable in the images."""
        if self.encoder == CLIP:
            return clip_image_embedding(self.clip_model, ctx.device)
        vae = ctx.model.vae if self.encoder == BASE else load_vae(self.encoder, ctx.device,
                                                                   where="adv_embedding.encoder")
        dtype = next(vae.parameters()).dtype
        return lambda x: to_latent(vae, x.to(dtype))[0].float()

    def apply(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext) -> torch.Tensor:
        embed = self.embedding(ctx)
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i:i + self.batch_size]
            out.append(self.perturb(embed, x, generator, ctx.device))
        return torch.cat(out)

    def perturb(self, embed: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, generator: torch.Generator,
                device: str) -> torch.Tensor:
        """The PGD perturbation of one batch, quantised toward the input; ``||out - x||_inf <= eps`` exactly."""
        eps = self.eps
        x_dev = x.to(device, torch.float32)
        with torch.no_grad():
            z0 = embed(x_dev)
        if self.random_start:
            delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
        else:
            delta = torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).to(device, torch.float32)
        alpha = self.step_size * eps
        with torch.enable_grad():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = ((embed(x_dev + delta) - z0) ** 2).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
                    delta = (x_dev + delta).clamp(0, 1) - x_dev
        delta = delta.detach().cpu()
        # onto the 8-bit grid, toward the input: never outside the budget, and unchanged by the harness's rounding
        # when the input is on the grid (as stored images are)
        delta = torch.trunc(delta * 255.0) / 255.0
        return (x + delta).clamp(0.0, 1.0)


def clip_image_embedding(model: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The L2-normalised image embedding of the CLIP scorer ``model`` (:func:`bench.measures.clip_score.scorer`),
    differentiable in the images: the scorer's own preprocessing where it is differentiable (the tiny world's:
    resize and normalise on tensors), else open_clip's resize, centre crop and normalisation written on tensors."""
    import torch.nn.functional as F

    from markbench.measures.clip_score import scorer

    s = scorer(model, None, device)
    net = s.model
    probe = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)  # (no random numbers: the global RNG stays untouched)
    out = s.preprocess_images(probe)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        prep = s.preprocess_images
    else:  # open_clip's PIL transform: the same steps on tensors (bicubic resize of the short side, centre crop)
        cfg = getattr(net.visual, "preprocess_cfg", {})
        size = cfg.get("size", getattr(net.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)

        def prep(x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            scale = size / min(h, w)
            x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                              antialias=True, align_corners=False)
            top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
            x = x[..., top:top + size, left:left + size]
            return (x - mean.to(x)) / std.to(x)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(net.encode_image(prep(x).to(device)).float(), dim=-1)

    return embed
