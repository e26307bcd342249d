"""The harness's standard text-to-image sampling.

Each image's initial noise comes from its own seed (one ``torch.Generator`` per image), so an image's content is
fixed by its prompt and seed, never by other cells. Its exact pixels also depend on the batch it was sampled in:
the float kernels (convolutions, matrix products) sum in an order that depends on the batch's size, and the last
bits that differ become one grey level in a few pixels after 8-bit rounding. ``run.batch_size`` is therefore part
of the generate stage's cache key (:meth:`bench.plan._Builder.request_identity`), so a cached image is always the
one this configuration makes (docs/reliability.md). Defences that change the initial noise (Tree-Ring, Gaussian
Shading) pass ``latents`` built with :func:`initial_latents` and then changed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .plugins import GenerationRequest


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    factor = getattr(pipe, "vae_scale_factor", 8)
    return (pipe.unet.config.in_channels, height // factor, width // factor)


def initial_latents(pipe, seeds: Iterable[int], height: int, width: int) -> torch.Tensor:
    """The standard-normal initial latents ``[N, C, h, w]`` the pipeline would draw for these seeds (unscaled)."""
    shape = latent_shape(pipe, height, width)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def accelerate(pipe, *, channels_last: bool = False, compile: bool = False) -> None:
    """Inference speed-ups that keep the weights and their names (so model attacks and weight diffs are unaffected):
    channels-last memory format for the UNet and the VAE (cuDNN's fastest convolution layout), PyTorch's fused
    scaled-dot-product attention in every attention layer (diffusers' ``AttnProcessor2_0``; the default on
    PyTorch 2, set explicitly so a loaded pipeline cannot fall back to the unfused path), and optionally
    ``torch.compile`` of the UNet in place (``nn.Module.compile``: parameter names unchanged). Idempotent."""
    done = getattr(pipe.unet, "_bench_accel", set())
    if "sdpa" not in done:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        done.add("sdpa")
    if channels_last and "channels_last" not in done:
        pipe.unet.to(memory_format=torch.channels_last)
        if getattr(pipe, "vae", None) is not None:
            pipe.vae.to(memory_format=torch.channels_last)
        done.add("channels_last")
    if compile and "compile" not in done:
        pipe.unet.compile()
        done.add("compile")
    pipe.unet._bench_accel = done


def generate_images(pipe, request: GenerationRequest, *, device: str = "cpu", latents: torch.Tensor | None = None,
                    prompt_prefix: str = "", progress: Callable[..., Iterable] | None = None,
                    prompt_filter: Callable[[str], str] | None = None, **pipe_kwargs: Any) -> torch.Tensor:
    """Sample ``len(request.prompts)`` images as float ``[N, 3, H, W]`` in ``[0, 1]`` on the CPU.

    ``prompt_filter``: what the served model does to each full prompt (prefix included) before sampling (a model
    attack with ``serves_prompts``, e.g. ``prompt_sanitise``)."""
    n = len(request.prompts)
    if len(request.seeds) != n:
        raise ValueError(f"{n} prompts but {len(request.seeds)} seeds")
    if latents is None:
        latents = initial_latents(pipe, request.seeds, request.height, request.width)
    if request.channels_last or request.compile:
        accelerate(pipe, channels_last=request.channels_last, compile=request.compile)
    dtype = pipe.unet.dtype
    batches = range(0, n, request.batch_size)
    ticker = None
    if progress is not None:  # one tick per denoising step of every batch: a real ETA for long generations
        total = len(batches) * request.num_inference_steps
        ticker = iter(progress(range(total), total=total, description=f"generate {n} images"))
        next(ticker, None)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            next(ticker, None)
            return callback_kwargs

        pipe_kwargs.setdefault("callback_on_step_end", on_step_end)
    out = []
    for start in batches:
        sl = slice(start, start + request.batch_size)
        prompts = [prompt_prefix + p for p in request.prompts[sl]]
        if prompt_filter is not None:
            prompts = [prompt_filter(p) for p in prompts]
        chunk = latents[sl]
        short = request.batch_size - len(prompts) if request.pad_to_batch else 0
        if short > 0:  # a batch of exactly batch_size: the kernels, and so the pixels, are those of a full batch
            prompts = prompts + [prompts[-1]] * short
            chunk = torch.cat([chunk, chunk[-1:].expand(short, *chunk.shape[1:])])
        kwargs = dict(pipe_kwargs)
        if request.negative_prompt:
            kwargs.setdefault("negative_prompt", [request.negative_prompt] * len(prompts))
        with torch.inference_mode():
            result = pipe(prompt=prompts, height=request.height, width=request.width,
                          num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                          latents=chunk.to(device=device, dtype=dtype), output_type="pt", **kwargs)
        out.append(result.images.float().cpu()[:len(prompts) - max(short, 0)])
    if ticker is not None:
        for _ in ticker:  # close the bar
            pass
    return torch.cat(out).clamp(0, 1)
