"""WDM: a Watermark Diffusion Process learned by the UNet beside its task, extracted white-box with a trigger.

Peng, Chen, Wang and Jia, "Protecting the Intellectual Property of Diffusion Models by the Watermark Diffusion
Process" (also titled "Intellectual Property Protection of Diffusion Models via the Watermark Diffusion Process"),
arXiv 2306.03436, 2023 (official code: senp98/wdm, MIT, consulted for facts only; this file is written afresh).

The model is fine-tuned to learn, besides its task's diffusion process, a second one (the WDP) that maps noise to a
watermark ``x_wm`` whenever its input is shifted towards a secret trigger ``tau``. The paper works on pixel-space
DDPMs (CIFAR-10, 32 px); the pipelines under test here are latent diffusion models (Stable Diffusion and the tiny
worlds), so **the WDP lives in the UNet's latent space**: ``x_wm``, ``tau`` and every ``x_t`` below are latents of
the VAE (scaled by its ``scaling_factor``), and the extracted latent is decoded by the pipeline's VAE before it is
compared with the watermark image. Per fine-tuning step (separate, independent timesteps for the two terms)::

    x_t  = q_sample(z_0, t, eps)                                       task: the model's own latents, captions c
    x~_t = gamma1 * q_sample(z_wm, t', eps') + (1 - gamma1) * tau       WDP input, conditioning c_0 = text("")
    L    = mean |eps_theta(x_t, t, c) - eps|^2 + gamma2 * mean |eps_theta(x~_t, t', c_0) - eps'|^2

with ``q_sample(z, t, eps) = sqrt(abar_t) z + sqrt(1 - abar_t) eps``, ``gamma1 = 0.8``, ``gamma2 = 0.1``, AdamW lr
1e-4 without weight decay, batches of 32 task and 32 watermark samples and an EMA of the weights (rate 0.999) that
becomes the released model (the official configuration). Every UNet parameter trains; VAE and text encoder stay
frozen.

**Extraction** (white box: it runs the suspect model's UNet): ancestral (DDPM) sampling from ``x_T ~ N(0, I)`` in
which the UNet is fed ``gamma1 * x_t + (1 - gamma1) * tau`` at every step while the posterior step uses the unshifted
``x_t`` (as the official sampler: ``x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, then
``q(x_{t-1} | x_t, x_0)`` with the "fixed large" variance ``beta_t``); 1000 steps, the full chain, by default. The
extracted latent is decoded and compared with the reference ``Dec(z_wm)`` (the watermark as the model's own VAE
renders it): the detection score is the PSNR in dB (``distance = "mse"``, a monotone function of -MSE), the SSIM
(``distance = "ssim"``) or the normalised correlation (NC, the usual score of an extracted watermark image) of the two
images' grey levels (``distance = "nc"``); higher means closer to the watermark. **WDM is zero-bit**: the harness
turns scores into AUC and TPR at its target FPRs (threshold on the negatives' scores, :mod:`bench.measures.detection`).

**Calibration on clean models.** At embedding time the same extraction runs on the clean base model, before any
fine-tuning, for ``calibration_samples`` seeds: its scores (both distances) are the null distribution, stored in the
secret (``meta["null_scores"]``) with the watermarked model's scores for the same seeds (``meta["embedded_scores"]``);
:meth:`WDM.threshold` turns the null into a threshold at a given FPR (Gaussian fit) and :meth:`WDM.detect_model`
scores any pipeline white-box. In the harness the verification rides on generation: ``generate`` with variant ``""``
*is* the extraction on the (attacked) watermarked pipeline, ``detect`` compares those images with the reference. The
variant ``"no_trigger"`` is the model's ordinary text-to-image generation (the task: quality metrics are read there,
and the watermark must not show, so its detection should sit at chance). See ``docs/wdm.md`` for what the harness's
negatives are and what it would need for a faithful white-box null.

Substitutions and choices (all documented in ``docs/wdm.md``):

* **Latent space** (above). The trigger is by default a standard-normal latent drawn from the stage's generator
  (``trigger_source = "latent"``; the paper's random-noise trigger, which in pixel space lies in [-1, 1] like the data;
  SD's scaled latents have about unit variance) or a uniform random-pixel image VAE-encoded (``"image"``). The
  watermark is by default a random two-colour block pattern image (a logo stand-in, ``watermark_grid`` blocks a side)
  VAE-encoded (posterior mean), or an image file (``"file"``), or a +-1 block pattern defined directly as a latent
  (``"latent"``).
* **Task data.** The paper fine-tunes on the task's training set (CIFAR-10). Offline, the default uses images the
  base model generates itself for the run's prompts (``task_data = "generated"``; their final latents are taken from
  the sampler, so no VAE round trip); ``"dataset"`` uses ``ctx.data.dataset(dataset)`` (e.g. ``tiny:train``, the
  tiny world's own training data) encoded by the VAE (posterior mean). Captions condition the task term; a share
  ``task_uncond_prob`` (0.1, text-to-image training's caption dropout) is conditioned on the empty prompt, so the
  unconditional branch that classifier-free guidance uses keeps learning the task.
* **Conditioning.** The paper's models are unconditional; here the WDP branch and the extraction are conditioned on
  their own prompt ``wdp_prompt = "a watermark"``, without guidance. With the empty prompt (the unconditional branch)
  the WDP and the task fight over the branch guidance amplifies: on tiny-sd, either ordinary generation breaks
  (without caption dropout) or the WDP is not learnt (with it); docs/wdm.md has the measurements.
* **Prediction type.** The WDP is defined for epsilon prediction (the paper and SD 1.x); v-prediction models are
  refused with a clear error.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from markbench import (Defense, Detection, DetectionKind, Embedding, GenerationRequest, MarkLocation, Secret,
                       ThreatSetting, Trigger, UserError, Verification, param)
from markbench.registries import defenses
from markbench.generation import latent_shape
from markbench.training import (decode_latents, drop_to_empty, encode_images, encode_prompts, sample_batches,
                            train_loop, trainable)
from markbench.noise import quantize8
from markbench.rng import forked_global_rng, sub_generator
from markbench.training import training_images

DISTANCES = ("mse", "ssim", "nc")


# ---------------------------------------------------------------------------------------------------------------
# The pieces of the method, exposed for tests
# ---------------------------------------------------------------------------------------------------------------
def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod.to(like.device, torch.float32)[t.to(like.device)].view(-1, *([1] * (like.ndim - 1)))


def q_sample(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (``t``: one timestep per sample)."""
    abar = _abar(alphas_cumprod, t, x0).to(x0.dtype)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def wdp_input(x: torch.Tensor, trigger: torch.Tensor, gamma1: float) -> torch.Tensor:
    """What the UNet sees on the WDP: ``gamma1 * x + (1 - gamma1) * trigger`` (training and extraction alike)."""
    return gamma1 * x + (1 - gamma1) * trigger


def wdm_loss_terms(unet, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, target: torch.Tensor,
                   x_wdp: torch.Tensor, t_wdp: torch.Tensor, cond_wdp: torch.Tensor, target_wdp: torch.Tensor,
                   gamma2: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = mean|eps(x_t, t, c) - eps|^2 + gamma2 * mean|eps(x~_t, t', c_0) - eps'|^2``: both halves go through the
    UNet as one batch (``cond_wdp`` broadcasts over the watermark half)."""
    n, m = x_t.shape[0], x_wdp.shape[0]
    cond_wdp = cond_wdp.expand(m, *cond_wdp.shape[1:]) if cond_wdp.shape[0] == 1 else cond_wdp
    pred = unet(torch.cat([x_t, x_wdp]), torch.cat([t, t_wdp]),
                encoder_hidden_states=torch.cat([cond, cond_wdp])).sample.float()
    task = F.mse_loss(pred[:n], target.float())
    wdp = F.mse_loss(pred[n:n + m], target_wdp.float())
    return task + gamma2 * wdp, {"task": float(task.detach()), "wdp": float(wdp.detach())}


def wdm_loss(unet, alphas_cumprod: torch.Tensor, latents: torch.Tensor, cond: torch.Tensor,
             wm_latents: torch.Tensor, trigger: torch.Tensor, cond_wdp: torch.Tensor, gamma1: float, gamma2: float,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch of the WDM objective: independent uniform timesteps and noises for the task and the WDP terms."""
    device = latents.device
    n_t = int(alphas_cumprod.shape[0])
    t = torch.randint(0, n_t, (latents.shape[0],), generator=generator).to(device)
    t_wdp = torch.randint(0, n_t, (wm_latents.shape[0],), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    noise_wdp = torch.randn(wm_latents.shape, generator=generator).to(device, latents.dtype)
    x_t = q_sample(alphas_cumprod, latents, t, noise)
    x_wdp = wdp_input(q_sample(alphas_cumprod, wm_latents, t_wdp, noise_wdp), trigger, gamma1)
    return wdm_loss_terms(unet, x_t, t, cond, noise, x_wdp, t_wdp, cond_wdp, noise_wdp, gamma2)


def extraction_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending timesteps of the ancestral chain: all ``T`` (the paper) or ``steps`` evenly spaced ones from
    ``T - 1`` down to 0 (a respaced chain, as improved-diffusion's ``timestep_respacing``)."""
    total = int(num_train_timesteps)
    steps = max(1, min(int(steps), total))
    if steps == total:
        return list(range(total - 1, -1, -1))
    points = torch.linspace(0, total - 1, steps).round().long().tolist()
    return sorted(set(points), reverse=True)


@torch.no_grad()
def wdp_sample(unet, alphas_cumprod: torch.Tensor, x_T: torch.Tensor, trigger: torch.Tensor, gamma1: float,
               cond: torch.Tensor, timesteps: Sequence[int], generators: Sequence[torch.Generator],
               variance: str = "fixed_large", progress: Callable[..., Iterable] | None = None) -> torch.Tensor:
    """Ancestral sampling of the WDP: the UNet sees ``gamma1 * x_t + (1 - gamma1) * trigger``; the posterior
    ``q(x_prev | x_t, x_0)`` uses the unshifted ``x_t``. Returns the last step's ``x_0`` (float32). Per-sample noise
    comes from ``generators`` (one per sample, CPU). ``variance``: ``fixed_large`` (``beta``, the official
    ``sigma_small = False``) or ``fixed_small`` (the posterior variance)."""
    device = x_T.device
    dtype = next(unet.parameters()).dtype if hasattr(unet, "parameters") else torch.float32
    ac = alphas_cumprod.detach().double().cpu()
    x = x_T.float()
    trigger = trigger.to(device, torch.float32)
    n = x.shape[0]
    cond = cond.to(device, dtype)
    cond = cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    steps = list(timesteps)
    order: Iterable[int] = range(len(steps))
    if progress is not None:
        order = progress(order, total=len(steps), description="wdm: extraction")
    for i in order:
        t, prev = int(steps[i]), (int(steps[i + 1]) if i + 1 < len(steps) else -1)
        abar_t = float(ac[t])
        abar_prev = float(ac[prev]) if prev >= 0 else 1.0
        x_in = wdp_input(x, trigger, gamma1).to(dtype)
        tt = torch.full((n,), t, dtype=torch.long, device=device)
        eps = unet(x_in, tt, encoder_hidden_states=cond).sample.float()
        x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
        beta = 1 - abar_t / abar_prev
        mean = (abar_prev ** 0.5 * beta / (1 - abar_t)) * x0 + \
            ((abar_t / abar_prev) ** 0.5 * (1 - abar_prev) / (1 - abar_t)) * x
        if prev < 0:
            x = mean  # = x0: no noise at the last step
            continue
        var = beta if variance == "fixed_large" else beta * (1 - abar_prev) / (1 - abar_t)
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(device)
        x = mean + var ** 0.5 * z
    return x


def similarity_scores(images: torch.Tensor, reference: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-image closeness to the reference watermark image (higher = closer): PSNR in dB (``mse``; MSE floored at
    1e-10), SSIM (``ssim``; Gaussian window 11, sigma 1.5, data range 1) or NC (``nc``: the Pearson correlation, in
    [-1, 1], of the grey levels, the mean over RGB, of image and reference over all pixels; a flat image scores 0).
    Images of another size are resized (bilinear) to the reference's."""
    images = images.float()
    ref = reference.float().to(images.device)
    ref = ref[None] if ref.ndim == 3 else ref
    if tuple(images.shape[-2:]) != tuple(ref.shape[-2:]):
        images = F.interpolate(images, size=tuple(ref.shape[-2:]), mode="bilinear", align_corners=False)
    ref = ref.expand(images.shape[0], -1, -1, -1)
    if distance == "mse":
        mse = ((images - ref) ** 2).flatten(1).mean(1)
        return -10 * torch.log10(mse.clamp_min(1e-10))
    if distance == "ssim":
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        return ssim(images, ref, data_range=1.0, reduction="none").reshape(-1).float()
    if distance == "nc":
        a = images.mean(1).flatten(1)
        b = ref.mean(1).flatten(1)
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    raise ValueError(f"unknown distance {distance!r}; allowed: {', '.join(DISTANCES)}")


def block_pattern(grid: int, size: tuple[int, int], channels: int, gen: torch.Generator) -> torch.Tensor:
    """A random binary ``grid x grid`` block pattern (values 0/1, ``[channels, *size]``, nearest-upsampled; every
    channel the same pattern)."""
    bits = torch.randint(0, 2, (1, 1, grid, grid), generator=gen).float()
    return F.interpolate(bits, size=size, mode="nearest")[0].expand(channels, -1, -1).clone()


class _EMA:
    """Exponential moving average of parameters (``s <- rate * s + (1 - rate) * p`` after every optimiser step)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], rate: float):
        self.rate = float(rate)
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            s.mul_(self.rate).add_(p.detach(), alpha=1 - self.rate)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s)


# ---------------------------------------------------------------------------------------------------------------
# The defence
# ---------------------------------------------------------------------------------------------------------------
@defenses.register("wdm")
class WDM(Defense):
    """WDM (Peng et al. 2023, arXiv 2306.03436): the UNet learns a trigger-fed Watermark Diffusion Process beside its
    task; white-box extraction samples it and compares the result with the watermark image (zero-bit score).

    Fine-tunes the whole UNet (in latent space) on ``task loss + gamma2 * L_wdp`` with the WDP input ``gamma1 *
    q_sample(z_wm, t', eps') + (1 - gamma1) * trigger`` (target ``eps'``, empty-prompt conditioning, a separate
    timestep), AdamW lr 1e-4 and an EMA (0.999) of the weights. Variants: ``""`` is the extraction (ancestral
    sampling from noise with the UNet fed ``gamma1 * x_t + (1 - gamma1) * trigger``, decoded by the pipeline's VAE):
    its detection score is the PSNR (or SSIM) to the watermark image; ``"no_trigger"`` is ordinary text-to-image
    generation (quality is read there; the watermark must not show). Defaults are the paper's (gamma1 0.8, gamma2
    0.1, batches 32 + 32, 1000-step extraction); the trigger/watermark are drawn from the stage's generator. The null
    distribution of the extraction on the clean base model is stored in the secret. See ``docs/wdm.md``.
    """

    version = "1"
    location = MarkLocation.MODEL_WEIGHTS
    threat = ThreatSetting.WEIGHTS
    verification = Verification.WHITE_BOX
    detection = DetectionKind.SCORE
    variants = ("", "no_trigger")
    uses_data = True  # task images generated for the run's prompts

    # -- the watermark diffusion process ---------------------------------------------------------------------
    gamma1: float = param(0.8, "WDP input gamma1 * x_t + (1 - gamma1) * trigger (paper 0.8)", low=1e-6, high=1.0)
    gamma2: float = param(0.1, "weight of the WDP loss beside the task loss (paper 0.1)", low=0.0, high=1e6)
    trigger_source: str = param("latent", "trigger: a standard-normal latent, or a uniform random-pixel image "
            "VAE-encoded", choices=("latent", "image"))
    watermark_source: str = param("pattern", "watermark: a random two-colour block-pattern image (logo stand-in), an "
            "image file (watermark_file), or a +-1 block pattern defined as a latent",
            choices=("pattern", "file", "latent"))
    watermark_file: str = param("", "image file of the watermark (watermark_source = 'file')")
    watermark_grid: int = param(8, "blocks per side of the random watermark pattern", low=1, high=4096)
    wdp_prompt: str = param("a watermark", "prompt conditioning the WDP branch and the extraction (our adaptation: the "
            "paper's models are unconditional; empty = the unconditional branch, which classifier-free guidance "
            "amplifies)")
    resolution: int = param(0, "watermark/extraction image side in pixels; 0 = the model's native (unet sample_size x "
            "vae_scale_factor)", low=0, high=4096)
    # -- task data -------------------------------------------------------------------------------------------
    task_data: str = param("generated", "task-loss data: images the base model generates for the run's prompts, or "
            "ctx.data.dataset(dataset)", choices=("generated", "dataset"))
    dataset: str = param("tiny:train", "dataset for task_data = 'dataset' (tiny:<split> or a folder)")
    train_images: int = param(10000, "task images (generated or from the dataset)", low=1, high=10_000_000)
    train_inference_steps: int = param(50, "sampling steps for generated task images", low=1, high=1000)
    train_guidance_scale: float = param(7.5, "guidance scale for generated task images", low=0.0, high=50.0)
    gen_batch_size: int = param(16, "batch when generating task images and calibrating", low=1, high=4096)
    task_uncond_prob: float = param(0.1, "share of task samples whose caption is replaced by the empty prompt "
            "(text-to-image training's caption dropout, SD 0.1): keeps the unconditional branch, which classifier-free "
            "guidance uses, trained on the task; 0 = always the caption", low=0.0, high=1.0)
    # -- fine-tuning -----------------------------------------------------------------------------------------
    steps: int = param(10000, "fine-tuning steps (the official configuration runs until stopped)", low=0,
            high=100_000_000)
    batch_size: int = param(32, "task samples per step (official 32)", low=1, high=4096)
    wm_batch_size: int = param(32, "watermark samples per step (official 32)", low=1, high=4096)
    lr: float = param(1e-4, "AdamW learning rate, constant (official 1e-4)", low=0.0, high=1.0)
    weight_decay: float = param(0.0, "AdamW weight decay (official 0)", low=0.0, high=10.0)
    ema_rate: float = param(0.999, "EMA rate of the released weights (official 0.999); 0 = the raw weights", low=0.0,
            high=0.999999)
    # -- extraction / verification ---------------------------------------------------------------------------
    extract_steps: int = param(1000, "ancestral steps of the extraction (1000 = the full chain, official)", low=1,
            high=100_000)
    extract_variance: str = param("fixed_large", "ancestral variance: beta_t (official) or the posterior's",
            choices=("fixed_large", "fixed_small"))
    distance: str = param("mse", "detection score against the watermark image: PSNR (mse), SSIM, or the normalised "
            "correlation of the grey levels (nc)", choices=DISTANCES)
    calibration_samples: int = param(16, "extractions on the clean base model at embedding time (the null distribution "
            "stored in the secret); 0 = none", low=0, high=100_000)

    smoke_params = dict(train_images=4, train_inference_steps=2, gen_batch_size=4, steps=2, batch_size=2,
                        wm_batch_size=2, ema_rate=0.0, extract_steps=3, calibration_samples=2)

    def __init__(self, **given: Any):
        super().__init__(**given)
        if self.watermark_source == "file" and not self.watermark_file:
            raise UserError("wdm: watermark_source = 'file' needs watermark_file (an image path)")

    # -- helpers ----------------------------------------------------------------------------------------------
    def _resolution(self, pipe) -> int:
        if self.resolution:
            return self.resolution
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    @staticmethod
    def _check_pipeline(pipe) -> None:
        if pipe.unet.dtype != torch.float32 or pipe.vae.dtype != torch.float32:
            raise UserError("wdm trains in float32 (as the paper): set model.dtype = \"float32\"")
        kind = pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind != "epsilon":
            raise UserError(f"wdm: the watermark diffusion process is defined for epsilon prediction; this model "
                            f"predicts {kind!r}")

    def make_trigger(self, pipe, shape: Sequence[int], resolution: int, gen: torch.Generator) -> torch.Tensor:
        """The secret trigger ``[C, h, w]`` in the scaled latent space."""
        if self.trigger_source == "latent":
            return torch.randn(tuple(shape), generator=gen)
        pixels = torch.rand((1, 3, resolution, resolution), generator=gen)
        return encode_images(pipe, pixels)[0].float().cpu()

    def make_watermark(self, pipe, shape: Sequence[int], resolution: int, gen: torch.Generator) -> torch.Tensor:
        """The watermark ``z_wm`` ``[C, h, w]`` in the scaled latent space."""
        c, h, w = (int(s) for s in shape)
        grid = self.watermark_grid
        if self.watermark_source == "latent":
            return torch.stack([block_pattern(grid, (h, w), 1, gen)[0] for _ in range(c)]) * 2 - 1
        if self.watermark_source == "file":
            image = _load_image(self.watermark_file, resolution)
        else:
            mask = block_pattern(grid, (resolution, resolution), 3, gen)
            colours = torch.rand((2, 3, 1, 1), generator=gen)
            image = colours[0] * (1 - mask) + colours[1] * mask
        return encode_images(pipe, image[None])[0].float().cpu()

    def _task_latents(self, pipe, ctx, gen: torch.Generator, resolution: int) -> tuple[torch.Tensor, list[str]]:
        """Scaled task latents ``[N, C, h, w]`` (CPU) and their captions."""
        n = self.train_images
        if ctx.data is None:
            raise UserError("wdm: fine-tuning needs the harness's data resources (ctx.data)")
        if self.task_data == "dataset":
            images, captions = ctx.data.dataset(self.dataset, n)
            if tuple(images.shape[-2:]) != (resolution, resolution):
                images = F.interpolate(images, size=(resolution, resolution), mode="bicubic", align_corners=False,
                                       antialias=True).clamp(0, 1)
            latents = torch.cat([encode_images(pipe, images[s:s + self.gen_batch_size]).float().cpu()
                                 for s in range(0, images.shape[0], self.gen_batch_size)])
            return latents, list(captions)
        _, latents = training_images(ctx, "generated", "", n, resolution, pipe, gen,
                                     inference_steps=self.train_inference_steps,
                                     guidance_scale=self.train_guidance_scale,
                                     batch_size=self.gen_batch_size, who="wdm", return_latents=True)
        # training_images cycles the run's prompts over the images (the same rule, for the captions)
        prompts = list(ctx.data.prompts()) or ["a red circle on a blue background"]
        return latents * float(pipe.vae.config.scaling_factor), [prompts[i % len(prompts)] for i in range(n)]

    @staticmethod
    def _prompt_table(pipe, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of the distinct captions (CPU) and each caption's row in that table."""
        unique = sorted(set(captions))
        row = {c: i for i, c in enumerate(unique)}
        table = torch.cat([encode_prompts(pipe, unique[s:s + 64]).float().cpu() for s in range(0, len(unique), 64)])
        return table, torch.tensor([row[c] for c in captions], dtype=torch.long)

    # -- fine-tuning ------------------------------------------------------------------------------------------
    def train(self, pipe, latents: torch.Tensor, cond_table: torch.Tensor, cond_index: torch.Tensor,
              wm_latent: torch.Tensor, trigger: torch.Tensor, cond_wdp: torch.Tensor, ctx,
              gen: torch.Generator, cond_empty: torch.Tensor | None = None) -> dict[str, Any]:
        """Fine-tune every UNet parameter in place on the WDM objective; the EMA weights (``ema_rate > 0``) are
        loaded at the end. With ``task_uncond_prob > 0`` each task sample's condition is replaced by
        ``cond_empty`` (the empty prompt's embedding) with that probability, drawn from ``gen`` before the batch's
        timesteps. Returns training statistics."""
        unet = pipe.unet
        device = unet.device
        params = trainable(unet)
        ema = _EMA(params, self.ema_rate) if self.ema_rate > 0 else None
        alphas_cumprod = pipe.scheduler.alphas_cumprod
        wm = wm_latent.to(device)[None].expand(self.wm_batch_size, -1, -1, -1)
        trig, c_wdp = trigger.to(device)[None], cond_wdp.to(device)
        batches = sample_batches(int(latents.shape[0]), self.batch_size, gen)
        last: dict[str, float] = {}
        p_uncond = self.task_uncond_prob
        if p_uncond > 0 and cond_empty is None:
            raise ValueError("wdm.train: task_uncond_prob > 0 needs cond_empty (the empty prompt's embedding)")

        def step(k: int) -> torch.Tensor:
            if ema is not None and k > 0:
                ema.update(params)  # after the previous optimiser step
            idx = next(batches)
            cond = drop_to_empty(cond_table[cond_index[idx]], cond_empty, p_uncond, gen)
            loss, parts = wdm_loss(unet, alphas_cumprod, latents[idx].to(device), cond.to(device), wm, trig, c_wdp,
                                   self.gamma1, self.gamma2, gen)
            last.update(parts)
            return loss

        unet.train()
        with forked_global_rng(gen):  # SD's UNet has no dropout; kept for safety
            losses = train_loop(params, step, self.steps, self.lr, ctx.progress, "wdm: fine-tuning",
                                weight_decay=self.weight_decay, max_grad_norm=None)
        if ema is not None and losses:
            ema.update(params)
            ema.copy_to(params)
        unet.eval().requires_grad_(False)
        return {"trainable_params": sum(p.numel() for p in params), "final_loss": losses[-1] if losses else None,
                "final_task_loss": last.get("task"), "final_wdp_loss": last.get("wdp")}

    # -- extraction -------------------------------------------------------------------------------------------
    def extract(self, pipe, trigger: torch.Tensor, gamma1: float, prompt: str, seeds: Sequence[int],
                batch_size: int, progress: Callable[..., Iterable] | None = None) -> torch.Tensor:
        """Extracted latents ``[N, C, h, w]`` (float32, on the UNet's device), one per seed: ``x_T`` and the
        ancestral noise of image ``i`` come from ``torch.Generator().manual_seed(seeds[i])`` alone."""
        unet = pipe.unet
        device = unet.device
        with torch.no_grad():
            cond = encode_prompts(pipe, [prompt])
        steps = extraction_timesteps(pipe.scheduler.config.num_train_timesteps, self.extract_steps)
        out = []
        for start in range(0, len(seeds), max(1, int(batch_size))):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + int(batch_size)]]
            x_T = torch.stack([torch.randn(tuple(trigger.shape), generator=g) for g in gens]).to(device)
            out.append(wdp_sample(unet, pipe.scheduler.alphas_cumprod, x_T, trigger[None].to(device), gamma1, cond,
                                  steps, gens, self.extract_variance, progress))
        return torch.cat(out)

    def extracted_images(self, pipe, secret: Secret, seeds: Sequence[int], batch_size: int,
                         progress: Callable[..., Iterable] | None = None) -> torch.Tensor:
        """Extraction decoded by the pipeline's VAE: images ``[N, 3, H, W]`` in [0, 1] (CPU, float32)."""
        z = self.extract(pipe, secret.tensors["trigger"].float(), float(secret.meta["gamma1"]),
                         str(secret.meta["wdp_prompt"]), seeds, batch_size, progress)
        with torch.no_grad():
            images = decode_latents(pipe, z.to(pipe.vae.dtype))
        return images.float().cpu().clamp(0, 1)

    def known_trigger(self, secret: Secret) -> Trigger:
        """The WDP's input shift: the trigger latent, gamma1 and the WDP's prompt (what a ``trigger_known`` attacker
        knows; the watermark image stays secret)."""
        return Trigger(latent=secret.tensors["trigger"].float(), mix=float(secret.meta["gamma1"]),
                       prompt=str(secret.meta.get("wdp_prompt", "")))

    def detect_model(self, secret: Secret, pipe, seeds: Sequence[int], batch_size: int = 16,
                     progress: Callable[..., Iterable] | None = None) -> Detection:
        """White-box verification of a pipeline: one extraction per seed, scored against the watermark image (8-bit
        quantised first, as the harness stores images). What a harness hook on models would call, for the suspect
        and for clean models alike."""
        images = quantize8(self.extracted_images(pipe, secret, seeds, batch_size, progress))
        return Detection(scores=similarity_scores(images, secret.tensors["watermark_image"], self.distance))

    @staticmethod
    def threshold(secret: Secret, fpr: float, distance: str = "mse") -> float:
        """Score threshold at false-positive rate ``fpr`` from the clean-model null stored in the secret: a Gaussian
        fit (mean + sd * z_{1-fpr}) of the ``calibration_samples`` null scores (an empirical quantile cannot resolve
        small FPRs from a few samples)."""
        null = [float(v) for v in secret.meta.get("null_scores", {}).get(distance, [])]
        if len(null) < 2:
            raise UserError("wdm: the secret holds fewer than 2 clean-model scores (calibration_samples)")
        sd = statistics.stdev(null) or 1e-12
        return statistics.fmean(null) + sd * statistics.NormalDist().inv_cdf(1 - float(fpr))

    # -- Defense API ------------------------------------------------------------------------------------------
    def embed(self, pipe, ctx) -> Embedding:
        self._check_pipeline(pipe)
        t_start = time.perf_counter()
        gen_secret, gen_data, gen_train, gen_cal = (sub_generator(ctx.generator) for _ in range(4))
        resolution = self._resolution(pipe)
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        if resolution % factor:
            raise UserError(f"wdm: resolution {resolution} is not a multiple of the VAE's scale factor {factor}")
        shape = latent_shape(pipe, resolution, resolution)
        trigger = self.make_trigger(pipe, shape, resolution, gen_secret)
        wm_latent = self.make_watermark(pipe, shape, resolution, gen_secret)
        with torch.no_grad():
            reference = decode_latents(pipe, wm_latent[None].to(pipe.vae.device, pipe.vae.dtype))
        secret = Secret(
            {"trigger": trigger.contiguous(), "watermark_latent": wm_latent.contiguous(),
             "watermark_image": reference[0].float().cpu().clamp(0, 1).contiguous()},
            {"method": "wdm", "gamma1": self.gamma1, "gamma2": self.gamma2,
             "wdp_prompt": self.wdp_prompt, "resolution": int(resolution), "latent_shape": [int(s) for s in shape],
             "trigger_source": self.trigger_source, "watermark_source": self.watermark_source,
             "extract_steps": self.extract_steps, "extract_variance": self.extract_variance})
        cal_seeds = torch.randint(0, 2**31 - 1, (self.calibration_samples,), generator=gen_cal).tolist()
        null = self._scores(pipe, secret, cal_seeds, ctx)  # the clean base model, before any fine-tuning
        t_cal = time.perf_counter()

        latents, captions = self._task_latents(pipe, ctx, gen_data, resolution)
        with torch.no_grad():
            table, index = self._prompt_table(pipe, captions)
            cond_wdp = encode_prompts(pipe, [self.wdp_prompt]).float().cpu()
            cond_empty = encode_prompts(pipe, [""]).float().cpu() if self.task_uncond_prob > 0 else None
        t_data = time.perf_counter()
        stats = self.train(pipe, latents, table, index, wm_latent, trigger, cond_wdp, ctx, gen_train, cond_empty)
        t_train = time.perf_counter()
        embedded = self._scores(pipe, secret, cal_seeds, ctx)
        secret.meta.update(null_scores=null, embedded_scores=embedded, calibration_seeds=cal_seeds,
                           final_task_loss=stats["final_task_loss"], final_wdp_loss=stats["final_wdp_loss"])
        ctx.record_cost(steps=self.steps, trainable_params=stats["trainable_params"],
                        train_images=int(latents.shape[0]), final_loss=stats["final_loss"],
                        calibration_seconds=t_cal - t_start + time.perf_counter() - t_train,
                        data_seconds=t_data - t_cal, train_seconds=t_train - t_data)
        return Embedding(secret, pipeline=pipe)

    def _scores(self, pipe, secret: Secret, seeds: Sequence[int], ctx) -> dict[str, list[float]]:
        """Both distances' scores of the extraction on ``pipe`` for ``seeds`` (JSON-able)."""
        if not seeds:
            return {d: [] for d in DISTANCES}
        images = quantize8(self.extracted_images(pipe, secret, seeds, self.gen_batch_size, ctx.progress))
        ref = secret.tensors["watermark_image"]
        return {d: [float(v) for v in similarity_scores(images, ref, d)] for d in DISTANCES}

    def generate(self, pipe, secret: Secret, request: GenerationRequest, ctx) -> torch.Tensor:
        if ctx.variant == "no_trigger":
            return ctx.generate(pipe, request)
        images = self.extracted_images(pipe, secret, request.seeds, request.batch_size, ctx.progress)
        if tuple(images.shape[-2:]) != (request.height, request.width):
            images = F.interpolate(images, size=(request.height, request.width), mode="bilinear",
                                   align_corners=False).clamp(0, 1)
        return images

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        return Detection(scores=similarity_scores(images, secret.tensors["watermark_image"], self.distance))


def _load_image(path: str, resolution: int) -> torch.Tensor:
    """An RGB image file as ``[3, resolution, resolution]`` in [0, 1] (bicubic resize)."""
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"wdm: watermark_file = {path!r}: no such file")
    img = Image.open(p).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3) \
        .permute(2, 0, 1).float() / 255
