"""Regeneration attacks: push the image through a generative model and take what comes back.

Zhao et al., NeurIPS 2024, "Invisible Image Watermarks Are Provably Removable Using Generative AI": map the image
to a latent representation, add Gaussian noise there (destroying the watermark's information), and reconstruct
with a generative model (a VAE decoder, or a diffusion model's denoiser). WAVES (An et al., ICML 2024, "WAVES:
Benchmarking the Robustness of Image Watermarks") benchmarks the diffusion form as Regen-Diff and its repetition as
Rinse-2xDiff / Rinse-4xDiff, and the VAE form as Regen-VAE / Regen-KLVAE.

By default all three use the model the harness hands them (``needs_model = "base"``: the run's clean base pipeline,
what an attacker of released weights has). Which model the attacker uses is a parameter and part of the result:
``regen_vae``'s ``vae`` may name an independent VAE the defender never saw (the tiny world ships ``tiny-vae-ind``,
trained apart from tiny-sd), ``regen_diffusion``'s and ``rinse``'s ``model`` another pipeline (the tiny world ships
``tiny-sd-ind``: that VAE with a smaller UNet trained apart from tiny-sd, and the public text encoder)
(:mod:`bench.models`: ``vae_source``, ``pipeline_source``).
"""

from __future__ import annotations

from typing import Any

import torch

from markbench import AttackContext, image_attacks, ImageAttack, param
from markbench.latents import from_latent, to_latent
from markbench.models import BASE, load_attacker_pipeline, load_vae, pipeline_source, vae_source


def _latent_size_ok(vae: Any, images: torch.Tensor) -> None:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        from markbench import PluginError

        raise PluginError(f"regeneration needs image sides divisible by the VAE's factor {factor}, got {h}x{w}")


@image_attacks.register("regen_vae")
class RegenVAE(ImageAttack):
    """Regeneration through a VAE: encode (posterior mean), optionally add Gaussian noise to the latent, decode.

    Zhao et al., NeurIPS 2024 ("Invisible image watermarks are provably removable using generative AI"), Sec. 3:
    ``x' = decode(encode(x) + N(0, sigma^2 I))``; WAVES' Regen-VAE / Regen-KLVAE is the same with other VAEs. The VAE
    is the base pipeline's (``needs_model = "base"``); the latent is the scaled latent the UNet sees
    (:func:`bench.latents.to_latent`, roughly unit variance), so ``latent_noise`` is in those units.

    Strength mapping: ``latent_noise = 0.5 * max(0, 2 s - 1)``: up to s = 0.5 (the default) the plain
    encode-decode round trip, the noise then grows to sigma = 0.5 at s = 1. Strength 0 is not the identity: it is
    the VAE's reconstruction error (hence ``zero_strength_tolerance``).

    ``vae``: ``"base"`` (the default), or a VAE the defender never saw: a shipped attacker autoencoder (the tiny
    world's ``tiny-vae-ind``: tiny-sd's architecture, trained from another seed on other images), a built-in model's
    VAE (e.g. ``tiny-sd-rt``) or a VAE folder (:func:`bench.models.vae_source`); the noise is then in that VAE's own
    scaled latent units. The stage is keyed by a fingerprint of the named weights (``Param.names_model``).
    """

    version = "1"
    needs_model = "base"
    strength_mapping = "latent_noise = 0.5 max(0, 2 s - 1)"
    zero_strength_tolerance = 0.2
    latent_noise: float = param(0.0, "std of the Gaussian noise added to the scaled latent (Zhao et al.'s sigma)",
            low=0.0, high=4.0)
    batch_size: int = param(16, "images encoded at once", low=1, high=1024)
    vae: str = param(BASE, "the attacker's VAE: 'base' (the base model's), a shipped attacker autoencoder (e.g. "
            "'tiny-vae-ind', trained independently of tiny-sd), a built-in model (e.g. 'tiny-sd-rt') or a VAE folder",
            keyed_at_default=False, names_model="vae")

    def __init__(self, **given: Any):
        super().__init__(**given)
        vae_source(self.vae, "regen_vae.vae")  # a name or folder that is none: refused when the config is read

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"latent_noise": 0.5 * max(0.0, 2.0 * s - 1.0)}

    @torch.no_grad()
    def apply(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext) -> torch.Tensor:
        vae = ctx.model.vae if self.vae == BASE else load_vae(self.vae, ctx.device, where="regen_vae.vae")
        _latent_size_ok(vae, images)
        dtype = next(vae.parameters()).dtype
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i:i + self.batch_size].to(ctx.device, dtype)
            z, _ = to_latent(vae, x)
            if self.latent_noise > 0:
                noise = torch.randn(z.shape, generator=generator, dtype=torch.float32)
                z = z + self.latent_noise * noise.to(z.device, z.dtype)
            out.append(from_latent(vae, z).float().cpu())
        return torch.cat(out).clamp(0.0, 1.0)


def img2img_pipeline(pipe: Any) -> Any:
    """The stock diffusers ``StableDiffusionImg2ImgPipeline`` on the base pipeline's components (shared weights,
    a scheduler of its own so that the base's is never touched)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def regenerate(img2img: Any, images: torch.Tensor, generator: torch.Generator, noise_step: int,
               num_inference_steps: int, batch_size: int, device: str) -> torch.Tensor:
    """One pass of diffusion regeneration: img2img with an empty prompt at strength ``noise_step / T``.

    Stock img2img encodes the image (a sample of the VAE posterior), adds the scheduler's noise for the first
    timestep of the last ``int(num_inference_steps * strength)`` steps of its schedule (``noise_step`` rounded
    down to the schedule's grid) and denoises them. Empty prompt, no classifier-free guidance (with an empty prompt
    the conditional and unconditional predictions are the same, so guidance would change nothing but the cost).
    """
    total = int(img2img.scheduler.config.num_train_timesteps)
    strength = min(max(noise_step, 1), total) / total
    steps = max(num_inference_steps, -(-total // max(noise_step, 1)))  # at least one denoising step
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        res = img2img(prompt=[""] * x.shape[0], image=x, strength=strength, num_inference_steps=steps,
                      guidance_scale=1.0, generator=generator, output_type="pt")
        out.append(res.images.float().cpu())
    return torch.cat(out).clamp(0.0, 1.0)


class _Img2ImgCache:
    """One img2img pipeline per base pipeline object (built from its components: cheap, but not free)."""

    def __init__(self) -> None:
        self._pipes: dict[int, Any] = {}

    def get(self, pipe: Any) -> Any:
        key = id(pipe)
        if key not in self._pipes:
            self._pipes = {key: img2img_pipeline(pipe)}
        return self._pipes[key]


@image_attacks.register("regen_diffusion")
class RegenDiffusion(ImageAttack):
    """Regeneration through the diffusion model: encode, noise to step t, denoise with an empty prompt (img2img).

    Zhao et al., NeurIPS 2024 ("Invisible image watermarks are provably removable using generative AI"), the
    diffusion instance of their regeneration attack; WAVES (An et al., ICML 2024) "Regen-Diff". Implemented with
    diffusers' stock ``StableDiffusionImg2ImgPipeline`` built from the base pipeline's components
    (``needs_model = "base"``), strength ``noise_step / T`` (T = 1000 training steps), its scheduler, empty prompt.

    Strength mapping (WAVES' Regen-Diff range, noise steps 40 to 200): ``noise_step = round(40 + 160 s)``; the
    default (s = 0.5) is 120. As stock img2img does, the image is noised to the first of the last ``int(N t / T)``
    steps of the N-step schedule (``num_inference_steps``), i.e. to the grid step just below t (DDIM with "leading"
    spacing, N = 50: t = 200 is noised to step 181 and denoised in 10 steps), so the effective step changes in jumps
    of T / N.

    ``model``: ``"base"`` (the default) or another pipeline, a built-in model (e.g. ``tiny-sd-rt``; the tiny world's
    independent attacker pipeline ``tiny-sd-ind``: the attacker VAE ``tiny-vae-ind`` with a smaller UNet trained on
    its latent space from another seed, on other images, and tiny-sd's public text encoder and scheduler) or a
    pipeline folder (:func:`bench.models.pipeline_source`). A standalone autoencoder (``tiny-vae-ind`` alone) is
    refused: the regeneration needs a diffusion model of that VAE's own latent space (``tiny-sd-ind`` is that one).
    """

    version = "1"
    needs_model = "base"
    strength_mapping = "noise_step = round(40 + 160 s) of 1000"
    zero_strength_tolerance = 0.2
    smoke_params = {"num_inference_steps": 25}
    noise_step: int = param(120, "diffusion step t the image is noised to (of T = 1000)", low=1, high=1000)
    num_inference_steps: int = param(50, "the sampler's schedule length (img2img runs the last int(N t / T) of its "
            "steps)", low=1, high=1000)
    batch_size: int = param(16, "images regenerated at once", low=1, high=1024)
    model: str = param(BASE, "the attacker's pipeline: 'base' (the base model), a built-in model (e.g. "
            "'tiny-sd-rt', or 'tiny-sd-ind': independent of tiny-sd) or a pipeline folder", keyed_at_default=False,
            names_model="pipeline")

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"noise_step": int(round(40 + 160 * s))}

    def __init__(self, **given: Any):
        super().__init__(**given)
        pipeline_source(self.model, "regen_diffusion.model")
        self._img2img = _Img2ImgCache()

    def attacker_pipeline(self, ctx: AttackContext) -> Any:
        """The pipeline that regenerates: the run's base (``ctx.model``) or the one ``model`` names."""
        if self.model == BASE:
            return ctx.model
        return load_attacker_pipeline(self.model, ctx.device, where="regen_diffusion.model")

    @torch.no_grad()
    def apply(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext) -> torch.Tensor:
        pipe = self.attacker_pipeline(ctx)
        _latent_size_ok(pipe.vae, images)
        return regenerate(self._img2img.get(pipe), images, generator, self.noise_step,
                          self.num_inference_steps, self.batch_size, ctx.device)


@image_attacks.register("rinse")
class Rinse(ImageAttack):
    """Rinsing: diffusion regeneration (``regen_diffusion``) repeated ``passes`` times on its own output.

    WAVES (An et al., ICML 2024) "Rinse-2xDiff" / "Rinse-4xDiff", after Zhao et al., NeurIPS 2024. Each pass is the
    stock img2img regeneration of ``regen_diffusion`` with ``round(total_noise_step / passes)`` noise steps, drawing
    its noise from the same generator in turn (so one pass with the same generator is exactly ``regen_diffusion``).

    Strength mapping: ``total_noise_step = round(40 + 160 s)``, split over the passes: with 2 passes 20 to 100
    steps each, with 4 passes 10 to 50 (WAVES' Rinse-2x and Rinse-4x ranges). ``model``: as ``regen_diffusion``'s.
    """

    version = "1"
    needs_model = "base"
    strength_mapping = "total_noise_step = round(40 + 160 s) of 1000, split over the passes"
    zero_strength_tolerance = 0.25
    smoke_params = {"num_inference_steps": 50, "passes": 1}  # one pass keeps the contract cheap; 2+ in tests
    passes: int = param(2, "regenerations in a row (WAVES: 2 or 4)", low=1, high=16)
    total_noise_step: int = param(120, "noise steps over all passes (each pass: total / passes)", low=1, high=4000)
    num_inference_steps: int = param(50, "the sampler's schedule length per pass", low=1, high=1000)
    batch_size: int = param(16, "images regenerated at once", low=1, high=1024)
    model: str = param(BASE, "the attacker's pipeline: 'base' (the base model), a built-in model (e.g. "
            "'tiny-sd-rt', or 'tiny-sd-ind': independent of tiny-sd) or a pipeline folder", keyed_at_default=False,
            names_model="pipeline")

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"total_noise_step": int(round(40 + 160 * s))}

    def __init__(self, **given: Any):
        super().__init__(**given)
        pipeline_source(self.model, "rinse.model")
        self._img2img = _Img2ImgCache()

    def attacker_pipeline(self, ctx: AttackContext) -> Any:
        """The pipeline that regenerates: the run's base (``ctx.model``) or the one ``model`` names."""
        if self.model == BASE:
            return ctx.model
        return load_attacker_pipeline(self.model, ctx.device, where="rinse.model")

    @property
    def noise_step_per_pass(self) -> int:
        return max(1, int(round(self.total_noise_step / self.passes)))

    @torch.no_grad()
    def apply(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext) -> torch.Tensor:
        pipe = self.attacker_pipeline(ctx)
        _latent_size_ok(pipe.vae, images)
        img2img = self._img2img.get(pipe)
        x = images
        for _ in range(self.passes):
            x = regenerate(img2img, x, generator, self.noise_step_per_pass, self.num_inference_steps,
                           self.batch_size, ctx.device)
        return x
