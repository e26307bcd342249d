"""Pieces every training method shares: encoding images and prompts, the denoising loss, a sampled-batch loop.

Only what is truly the same across methods lives here (CONVENTIONS: a training loop skeleton, not a base class).
All randomness comes from the caller's ``torch.Generator``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import UserError
from .noise import quantize8
from .plugins import GenerationRequest


def encode_prompts(pipe, prompts: Sequence[str], grad: bool = False) -> torch.Tensor:
    """CLIP text-encoder hidden states ``[N, 77, D]`` (what the UNet cross-attends to)."""
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    ids = tok.input_ids.to(pipe.text_encoder.device)
    with torch.set_grad_enabled(grad):
        return pipe.text_encoder(ids)[0]


def prompt_embeds(pipe, prompts: Sequence[str], device, chunk: int = 64) -> torch.Tensor:
    """Text embeddings exactly as the pipeline conditions on them at generation time (``pipe.encode_prompt``, no
    classifier-free guidance), detached, float32, on the CPU; ``chunk`` prompts per call."""
    out = []
    for start in range(0, len(prompts), chunk):
        emb, _ = pipe.encode_prompt(list(prompts[start:start + chunk]), device, 1, False)
        out.append(emb.detach().float().cpu())
    return torch.cat(out)


def encode_images(pipe, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = False) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents (posterior mean, or a sample drawn with ``generator``)."""
    vae = pipe.vae
    x = (images * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
    return z * vae.config.scaling_factor


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (differentiable)."""
    vae = pipe.vae
    return (vae.decode(latents / vae.config.scaling_factor).sample + 1) / 2


def drop_to_empty(cond: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Caption dropout: each row of ``cond`` ``[B, L, D]`` is replaced by ``empty`` (the empty prompt's embedding,
    ``[1, L, D]``) with probability ``p``, one draw from ``generator`` per row. ``p = 0`` draws nothing, so a caller's
    random stream is the same as without dropout."""
    if p <= 0:
        return cond
    drop = (torch.rand(cond.shape[0], generator=generator) < p).to(cond.device)
    return torch.where(drop[:, None, None], empty.to(cond).expand_as(cond), cond)


def add_noise(scheduler, latents: torch.Tensor, generator: torch.Generator,
              timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noisy, noise, t)`` with t ~ U{0..T-1} unless given."""
    n = latents.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = timesteps.to(latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def diffusion_loss(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator,
                   reduction: str = "mean") -> torch.Tensor:
    """The standard denoising loss ||eps_theta(z_t, t, c) - eps||^2 (or v) at a random t."""
    noisy, noise, t = add_noise(scheduler, latents, generator)
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    target = denoising_target(scheduler, latents, noise, t)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
    return loss.mean() if reduction == "mean" else loss


def fixed_noise_losses(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator,
                       repeats: int = 4, chunk: int = 16) -> torch.Tensor:
    """Per-image denoising loss ``[N]`` at noise and timesteps drawn from ``generator``: ``repeats`` times, each
    time one :func:`add_noise` draw for the whole set (t, then noise: the draws :func:`diffusion_loss` makes), the
    UNet run ``chunk`` images at a time (so the draws, and the values, do not depend on ``chunk``); the mean over
    the repeats. A caller that seeds ``generator`` the same way for every model gets the same draws for all of them,
    so two models' losses are paired image by image (the held-out loss of :mod:`bench.downstream`)."""
    total = torch.zeros(latents.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(repeats):
            noisy, noise, t = add_noise(scheduler, latents, generator)
            target = denoising_target(scheduler, latents, noise, t)
            for i in range(0, latents.shape[0], chunk):
                pred = unet(noisy[i:i + chunk], t[i:i + chunk], encoder_hidden_states=cond[i:i + chunk]).sample
                err = F.mse_loss(pred.float(), target[i:i + chunk].float(), reduction="none").mean((1, 2, 3))
                total[i:i + chunk] += err.double().cpu()
    return (total / repeats).float()


def sample_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """Endless epochs of shuffled index batches (each epoch a new permutation from ``generator``)."""
    if n < 1:
        raise ValueError("cannot sample batches from an empty dataset")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) == batch_size or n < batch_size:  # drop a short last batch
                yield idx


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter],
                   grad_clip: float = 0.0, sched: Any = None) -> None:
    """One step of a hand-written loop: zero the gradients, back-propagate ``loss``, clip the gradient norm of
    ``parameters`` to ``grad_clip`` (0: no clipping), step the optimiser, then the schedule if any."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    opt.step()
    if sched is not None:
        sched.step()


def train_loop(parameters: list[torch.nn.Parameter], step_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
               progress: Callable[..., Iterable] | None = None, description: str = "train",
               weight_decay: float = 1e-2, max_grad_norm: float | None = 1.0, schedule: str = "constant",
               warmup: int = 0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> list[float]:
    """AdamW over ``parameters`` for ``steps`` steps of ``step_fn(step) -> loss``; returns the losses."""
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    it: Iterable[int] = range(steps)
    if progress is not None:
        it = progress(it, total=steps, description=description)
    for step in it:
        opt.zero_grad(set_to_none=True)
        loss = step_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{description}: loss became {loss.item()} at step {step}")
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def denoising_finetune(pipe, latents: torch.Tensor, cond: torch.Tensor, parameters: list[torch.nn.Parameter],
                       generator: torch.Generator, steps: int, lr: float, batch_size: int,
                       progress: Callable[..., Iterable] | None = None, description: str = "finetune",
                       **loop) -> list[float]:
    """The text-to-image fine-tune every training attack shares: ``steps`` AdamW steps (:func:`train_loop`,
    ``loop`` its options) of the eps-prediction loss on shuffled batches of (``latents``, ``cond``), training
    ``parameters`` of ``pipe.unet``, which is left in train mode; returns the losses."""
    unet = pipe.unet
    unet.train()
    batches = sample_batches(len(cond), batch_size, generator)

    def step(_):
        idx = next(batches)
        return diffusion_loss(unet, pipe.scheduler, latents[idx], cond[idx], generator)

    return train_loop(parameters, step, steps, lr, progress, description, **loop)


def trainable(module: torch.nn.Module, names: Iterable[str] | None = None) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` on the named parameters (all if ``names`` is None) and return them."""
    wanted = None if names is None else set(names)
    out = []
    for name, p in module.named_parameters():
        on = wanted is None or name in wanted
        p.requires_grad_(on)
        if on:
            out.append(p)
    return out


class PerceptualLoss:
    """An image term between two batches in [0, 1]: ``"ssim"`` (1 - SSIM, torchmetrics, Gaussian window 11, sigma
    1.5), ``"mse"``, ``"lpips"`` (AlexNet LPIPS; needs the ``lpips`` package and its weights, not available
    offline) or ``"none"`` (zero). All are symmetric in their two arguments. ``owner`` and ``offline`` word the error
    when LPIPS is asked for but missing. Defences add their own kinds by subclassing (Stable Signature: Watson-DCT).
    """

    def __init__(self, kind: str, device=None, owner: str = "", offline: str = "perceptual = 'ssim'"):
        self.kind = kind
        self._lpips = None
        if kind == "lpips":
            from .errors import MissingDependencyError

            try:
                import lpips  # type: ignore[import-not-found]
            except ImportError as exc:
                raise MissingDependencyError(
                    f"{owner}: perceptual = 'lpips' needs the Python package 'lpips' (pip install lpips) and its "
                    f"AlexNet weights; offline, use {offline}") from exc
            self._lpips = lpips.LPIPS(net="alex", verbose=False).to(device or "cpu").eval().requires_grad_(False)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.kind == "ssim":
            from torchmetrics.functional.image import structural_similarity_index_measure as ssim

            return 1 - ssim(a, b, data_range=1.0)
        if self.kind == "mse":
            return torch.nn.functional.mse_loss(a, b)
        if self.kind == "lpips":
            return self._lpips(a * 2 - 1, b * 2 - 1).mean()
        return a.new_zeros(())


# ---------------------------------------------------------------------------------------------------------------
# Training images
# ---------------------------------------------------------------------------------------------------------------
def training_images(ctx, source: str, dataset: str, n: int, size: int, pipe=None, gen: torch.Generator | None = None,
                    inference_steps: int = 50, guidance_scale: float = 7.5, batch_size: int = 16,
                    who: str = "hidden", return_latents: bool = False):
    """``n`` training images ``[n, 3, size, size]`` in [0, 1] (8-bit values).

    ``source = "dataset"``: ``ctx.data.dataset(dataset, n)`` (e.g. ``tiny:train``), resized to ``size``;
    ``"generated"``: images the pipeline generates at the run's resolution for the run's prompts (seeds drawn from
    ``gen``), resized to ``size``. With ``return_latents`` (generated only) the images are generated at ``size``
    and the final denoised latents, unscaled (what the VAE decoder receives), are captured from the sampler's last
    step: ``(images, latents)``.
    """
    if ctx.data is None:
        raise UserError(f"{who}: training needs the harness's data resources (ctx.data)")
    latents = None
    if source == "dataset":
        images, _ = ctx.data.dataset(dataset, n)
    else:
        if pipe is None:
            raise UserError(f"{who}: train_source = 'generated' needs a pipeline")
        prompts = list(ctx.data.prompts()) or ["a red circle on a blue background"]
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=gen).tolist()
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        h, w = (size, size) if return_latents else (ctx.data.height, ctx.data.width)
        chunks, lat_chunks = [], []
        captured: dict[str, torch.Tensor] = {}

        def keep_latents(pipeline, step, timestep, callback_kwargs):
            captured["latents"] = callback_kwargs["latents"]
            return callback_kwargs

        starts = range(0, n, batch_size)
        for s in ctx.progress(starts, total=len(starts), description=f"{who}: training images"):
            req = GenerationRequest(prompts=tuple(chosen[s:s + batch_size]), seeds=tuple(seeds[s:s + batch_size]),
                                    height=h, width=w, num_inference_steps=inference_steps,
                                    guidance_scale=guidance_scale, batch_size=batch_size)
            kw = dict(callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"]) \
                if return_latents else {}
            chunks.append(ctx.generate(pipe, req, **kw))
            if return_latents:
                lat_chunks.append(captured["latents"].detach().float().cpu() / float(pipe.vae.config.scaling_factor))
        images = torch.cat(chunks)
        latents = torch.cat(lat_chunks) if return_latents else None
    images = images.float()
    if tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False,
                               antialias=True).clamp(0, 1)
    images = quantize8(images)
    return (images, latents) if return_latents else images
