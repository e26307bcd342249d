"""DDIM inversion: from an image back to the sampler's initial noise (the shared verifier of sampling-time marks).

Tree-Ring (Wen et al., NeurIPS 2023, arXiv 2305.20030) and Gaussian Shading (Yang et al., CVPR 2024,
arXiv 2404.04956) hide their mark in the initial latent ``z_T`` and read it back by inverting the image: encode it
with the VAE (the posterior *mean*, for reproducibility), then run the deterministic DDIM sampler backwards with the
*empty* prompt at guidance 1 (the verifier does not know the prompt) over the same timesteps the sampler used.
Attacks may use the same functions (e.g. to regenerate an image from its inverted noise).

Two inversions:

* ``"ddim"`` -- the usual approximation: the step from ``t_prev`` to ``t`` uses the noise prediction at the
  *current* latent ``z_{t_prev}`` (with timestep ``t``) in place of the unknown ``eps(z_t, t)``.
* ``"exact"`` -- the fixed-point inversion used by MarkDiffusion's "exact inversion" option (after Hong et al.,
  "On exact inversion of DPM-solvers", arXiv 2311.18387): each step solves ``z_t`` such that the *forward* DDIM step
  from ``z_t`` reproduces ``z_{t_prev}`` exactly, by ``fixed_point_iters`` iterations of
  ``z_t <- sqrt(a_t / a_prev) (z_prev - sqrt(1 - a_prev) eps(z_t)) + sqrt(1 - a_t) eps(z_t)``, started from the
  ``"ddim"`` estimate. It costs ``1 + fixed_point_iters`` UNet calls per step instead of one.

And, before either, an optional **decoder inversion** (``decoder_steps > 0``): the gradient-based decoder inversion
that Hong et al. ("On exact inversion of DPM-solvers", CVPR 2024, arXiv 2311.18387) use as part of the exact
inversion for Tree-Ring detection (Hong et al., NeurIPS 2024, arXiv 2409.18442, compare it with a gradient-free
one). The VAE encoder is not the decoder's inverse, so the latent is
refined from the encoder's posterior mean by gradient descent on ``||D(z) - x||^2`` (Adam, cosine learning rate,
``decoder_steps`` steps at ``decoder_lr``). It costs ``decoder_steps`` decoder forward and backward passes per image,
no UNet call; with a lossy small VAE it is where most of the lost noise is recovered, when it can be at all (the
decoder may map many latents to one image: docs/gaussian_shading.md measures what it recovers in the tiny world).

The latent shape, the VAE scaling factor and the noise schedule are read from the pipeline, never assumed. Whatever
scheduler the pipeline samples with, the inversion uses a DDIM schedule built from that scheduler's config (the same
``alphas_cumprod`` and timestep spacing).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Sequence

import torch

INVERSION_METHODS = ("ddim", "exact")


def latent_shape(pipe: Any, height: int, width: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the pipeline's initial latent for images of ``height x width`` pixels."""
    factor = int(getattr(pipe, "vae_scale_factor", 0) or 2 ** (len(pipe.vae.config.block_out_channels) - 1))
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not a multiple of the VAE's scale factor {factor}")
    return (int(pipe.unet.config.in_channels), height // factor, width // factor)


def _ddim(pipe: Any):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe.scheduler.config)


def _schedule(pipe: Any, num_inference_steps: int) -> tuple[list[int], torch.Tensor, float]:
    """The sampler's timesteps (descending), the cumulative alphas and the alpha after the last step."""
    sched = _ddim(pipe)
    sched.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in sched.timesteps]
    return timesteps, sched.alphas_cumprod.double(), float(sched.final_alpha_cumprod)


def _alpha(alphas: torch.Tensor, final: float, t: int) -> float:
    return float(alphas[t]) if t >= 0 else final


def empty_prompt_embeddings(pipe: Any, n: int, device: str | torch.device) -> torch.Tensor:
    """The text encoder's embedding of the empty prompt, repeated ``n`` times (the verifier's condition)."""
    tok = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    with torch.inference_mode():
        emb = pipe.text_encoder(tok.input_ids.to(device))[0]
    return emb.expand(n, -1, -1)


def _eps(pipe: Any, z: torch.Tensor, t: int, cond: torch.Tensor, alpha: float) -> torch.Tensor:
    out = pipe.unet(z.to(pipe.unet.dtype), t, encoder_hidden_states=cond.to(pipe.unet.dtype)).sample.to(z.dtype)
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return out
    if kind == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) z
        return alpha ** 0.5 * out + (1 - alpha) ** 0.5 * z
    raise ValueError(f"inversion supports epsilon and v_prediction schedulers, not prediction_type={kind!r}")


def _step(z: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """The deterministic DDIM update (eta 0) from cumulative alpha ``a_from`` to ``a_to`` with noise estimate eps."""
    x0 = (z - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
    return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps


@torch.no_grad()
def encode(pipe: Any, images: torch.Tensor, *, batch_size: int = 16, device: str | torch.device = "cpu"
           ) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] -> scaled latents ``z_0`` (the VAE posterior mean times its scaling)."""
    vae = pipe.vae
    scale = float(vae.config.scaling_factor)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device=device, dtype=vae.dtype) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean.float() * scale)
    return torch.cat(out)


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor, *, batch_size: int = 16) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (float, CPU)."""
    vae = pipe.vae
    scale = float(vae.config.scaling_factor)
    out = []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i:i + batch_size].to(device=vae.device, dtype=vae.dtype) / scale
        out.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def decoder_invert(pipe: Any, images: torch.Tensor, start: torch.Tensor, *, steps: int, lr: float = 0.05
                   ) -> torch.Tensor:
    """Scaled latents whose decoding matches ``images`` (``[N, 3, H, W]`` in [0, 1]) in mean squared error.

    Gradient descent from ``start`` (the encoder's scaled posterior mean, :func:`encode`) with Adam and a cosine
    learning rate from ``lr`` to 0 over ``steps`` steps. Only the latent is optimised: the gradient is taken with
    :func:`torch.autograd.grad` with respect to it alone, so the VAE's parameters get no ``.grad`` and are not changed.
    Deterministic (no randomness): the same images and start give the same latents.
    """
    if steps <= 0:
        return start.clone()
    vae = pipe.vae
    scale = float(vae.config.scaling_factor)
    target = images.to(device=vae.device, dtype=torch.float32) * 2 - 1
    z = start.detach().to(device=vae.device, dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(steps):
            rec = vae.decode((z / scale).to(vae.dtype)).sample.float()
            loss = ((rec - target) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, [z])
            z.grad = grad
            opt.step()
            sched.step()
    return z.detach()


@torch.no_grad()
def invert_latents(pipe: Any, latents: torch.Tensor, num_inference_steps: int, *, method: str = "ddim",
                   fixed_point_iters: int = 3, cond: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM-invert scaled latents ``z_0`` to initial noise ``z_T`` over the sampler's ``num_inference_steps``.

    ``cond``: text embeddings (default: the empty prompt); guidance is 1 (no classifier-free guidance).
    """
    if method not in INVERSION_METHODS:
        raise ValueError(f"unknown inversion method {method!r}; available: {', '.join(INVERSION_METHODS)}")
    device = pipe.unet.device
    z = latents.to(device=device, dtype=torch.float32)
    if cond is None:
        cond = empty_prompt_embeddings(pipe, z.shape[0], device)
    timesteps, alphas, final = _schedule(pipe, num_inference_steps)
    for i in reversed(range(len(timesteps))):
        t = timesteps[i]
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_prev = _alpha(alphas, final, t), _alpha(alphas, final, t_prev)
        z_prev = z
        z = _step(z_prev, _eps(pipe, z_prev, t, cond, a_t), a_prev, a_t)  # plain DDIM inversion step
        if method == "exact":
            for _ in range(fixed_point_iters):
                eps = _eps(pipe, z, t, cond, a_t)
                z = (a_t / a_prev) ** 0.5 * (z_prev - (1 - a_prev) ** 0.5 * eps) + (1 - a_t) ** 0.5 * eps
    return z


@torch.no_grad()
def sample_latents(pipe: Any, noise: torch.Tensor, num_inference_steps: int, *, cond: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The forward deterministic DDIM sampler (eta 0, guidance 1): initial noise ``z_T`` -> scaled latents ``z_0``.

    The exact inverse of :func:`invert_latents` with ``method="exact"`` (up to the fixed-point residual).
    """
    device = pipe.unet.device
    z = noise.to(device=device, dtype=torch.float32) * float(_ddim(pipe).init_noise_sigma)
    if cond is None:
        cond = empty_prompt_embeddings(pipe, z.shape[0], device)
    timesteps, alphas, final = _schedule(pipe, num_inference_steps)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_prev = _alpha(alphas, final, t), _alpha(alphas, final, t_prev)
        z = _step(z, _eps(pipe, z, t, cond, a_t), a_t, a_prev)
    return z


_RECENT: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_RECENT_MAX = 4


def invert_images(pipe: Any, images: torch.Tensor, num_inference_steps: int, *, method: str = "ddim",
                  fixed_point_iters: int = 3, batch_size: int = 16, decoder_steps: int = 0,
                  decoder_lr: float = 0.05, progress: Any = None) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] -> the initial noise ``[N, C, h, w]`` (float32, CPU) they came from.

    VAE posterior mean (refined by :func:`decoder_invert` when ``decoder_steps > 0``), empty prompt, guidance 1, DDIM
    inversion over ``num_inference_steps`` (see the module docstring for ``method``). Images whose size is not the pipeline's multiple are an error, not a silent resize.
    The last few results are kept in memory (keyed by the pipeline object and the images' bytes): two sampling-time
    defences verifying the same negatives invert them once. The result is a deterministic function of both.
    ``progress``: a stage context's ``progress`` (``iterable, total=, description=``), told of each finished batch.
    """
    latent_shape(pipe, images.shape[-2], images.shape[-1])  # checks the size
    digest = hashlib.sha256(images.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    key = (id(pipe), method, int(num_inference_steps), int(fixed_point_iters) if method == "exact" else 0,
           int(decoder_steps), float(decoder_lr) if decoder_steps else 0.0, tuple(images.shape), digest)
    if key in _RECENT:
        _RECENT.move_to_end(key)
        return _RECENT[key].clone()
    z = _invert_images(pipe, images, num_inference_steps, method=method, fixed_point_iters=fixed_point_iters,
                       batch_size=batch_size, decoder_steps=decoder_steps, decoder_lr=decoder_lr, progress=progress)
    _RECENT[key] = z.clone()
    while len(_RECENT) > _RECENT_MAX:
        _RECENT.popitem(last=False)
    return z


def _invert_images(pipe: Any, images: torch.Tensor, num_inference_steps: int, *, method: str,
                   fixed_point_iters: int, batch_size: int, decoder_steps: int = 0, decoder_lr: float = 0.05,
                   progress: Any = None) -> torch.Tensor:
    device = pipe.unet.device
    out = []
    starts: Any = range(0, images.shape[0], batch_size)
    if progress is not None:
        starts = progress(starts, total=len(starts),
                          description=f"inversion of {images.shape[0]} images (batches of {batch_size})")
    for i in starts:
        z0 = encode(pipe, images[i:i + batch_size], batch_size=batch_size, device=device)
        if decoder_steps:
            z0 = decoder_invert(pipe, images[i:i + batch_size], z0, steps=decoder_steps, lr=decoder_lr)
        out.append(invert_latents(pipe, z0, num_inference_steps, method=method,
                                  fixed_point_iters=fixed_point_iters).cpu())
    return torch.cat(out)


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """``||estimate - target|| / ||target||`` over the whole batch."""
    return float((estimate.double() - target.double()).norm() / target.double().norm())


__all__: Sequence[str] = ("INVERSION_METHODS", "latent_shape", "empty_prompt_embeddings", "encode", "decode",
                          "invert_latents", "sample_latents", "invert_images", "relative_error")
