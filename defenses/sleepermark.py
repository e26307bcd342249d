"""SleeperMark: a sleeper watermark in the UNet of a latent diffusion model, woken by a secret trigger.

Wang et al., "SleeperMark: Towards Robust Watermark against Fine-Tuning Text-to-image Diffusion Models", CVPR 2025,
arXiv 2412.04852 (official code: taco-group/SleeperMark, consulted for facts only; this file is written afresh).

Two stages, both run by :meth:`SleeperMark.embed` on the pipeline under test:

1. **Latent watermark pre-training.** A message-only secret encoder ``E(m)`` produces a latent residual
   ``delta_z`` (``z_w = z + E(m)``); a latent secret decoder ``D`` reads the bits back from a latent. Loss
   ``BCE(D(z_w), m) + l_img * MSE(Dec(z_w), Dec(z)) + l_perc * P(Dec(z), Dec(z_w))`` with ``l_img`` and ``l_perc``
   ramped linearly from 0. Every training sample carries its own random message (as in the official code); the
   embedded message ``m*`` is then drawn from the stage's generator and ``delta_z* = E(m*)`` is fixed.
2. **Sleeper fine-tuning.** Only the attention/transformer parameters of the UNet's up blocks that have attentions
   are trained (found by the UNet's own module names, so SD 1.x/2.x and the tiny worlds alike), against a frozen copy
   ``eps_0``::

       z_t    = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,   c = text(prompt),  c_tr = text(trigger + prompt)
       eps_wm = eps_0(z_t, t, c_tr) - sqrt(abar_t / (1 - abar_t)) * delta_z*
       L      = mean[w1(t) |eps(z_t,t,c_tr) - eps_wm|^2] + mean[w2(t) |eps(z_t,t,c_tr) - eps_0(z_t,t,c_tr)|^2]
                + mean |eps(z_t,t,c) - eps_0(z_t,t,c)|^2
       w1(t)  = eta * sigmoid(-(t - tau) / beta),   w2(t) = sigmoid((t - tau) / beta)

   ``eps_wm`` is the noise prediction whose implied clean latent is the reference's plus ``delta_z*``: the trigger
   pushes the residual into the late (low-noise) denoising steps; the last term keeps trigger-free behaviour.

Verification (black box): image -> VAE encoder (posterior **mean**, for reproducibility; the official code samples)
-> ``D`` -> bits. The secret carries the decoder's and the VAE encoder's weights, so verification needs nothing but
the secret and the images.

Substitutions and choices (all documented in ``docs/sleepermark.md``):

* **Perceptual term.** LPIPS needs network weights that cannot be fetched offline. The default ``perceptual =
  "ssim"`` uses ``1 - SSIM`` (torchmetrics, Gaussian window 11, sigma 1.5, data range 1) between ``Dec(z)`` and
  ``Dec(z_w)``; ``perceptual = "lpips"`` (AlexNet LPIPS, the paper's) is selectable where the ``lpips`` package and
  its weights are installed; ``"none"`` drops the term.
* **Training data.** The paper's stage 1 uses COCO images and stage 2 10k images the original model generated for
  10k captions. Offline, both stages use images the base model generates itself (``ctx.generate`` with the untouched
  pipeline, ``train_images`` of them, for the prompts of ``prompts``), VAE-encoded once; each training step samples
  the posterior (as the official code does). ``stage1_source = "random"`` uses standard-normal latents instead.
* **Any latent size.** The latent shape comes from the model (channels from the UNet, spatial size from
  ``resolution / vae_scale_factor``). The secret encoder's ``secret_res x secret_res`` map is resized to it by
  nearest neighbour (an upsampling at SD scale). The decoder keeps the paper's flatten + MLP: the flatten size is
  computed from the latent shape (512 * 4 * 4 = 8192 for SD's 64 x 64 latent, as in the paper). Images of another
  size are resized (bilinear) to ``resolution`` before encoding, as the official validation resizes to 512.
* **Schedules.** Stage 1 decays its learning rate linearly to 0 (the official ``get_linear_schedule_with_warmup``
  with no warm-up); stage 2 uses a cosine decay without warm-up.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import re
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from markbench import (Defense, Detection, DetectionKind, Embedding, GenerationRequest, MarkLocation, Secret,
                       ThreatSetting, Trigger, UserError, Verification, param, read_prompts)
from markbench.registries import defenses
from markbench.latent_nets import LatentDecoder, SecretEncoder
from markbench.latents import from_latent, to_latent
from markbench.noise import quantize8
from markbench.rng import global_rng_from
from markbench.training import PerceptualLoss, drop_to_empty, optimizer_step, prompt_embeds

TRIGGER = "*[Z]& "

# Module names (relative to the UNet) of the parameters stage 2 trains: in every up block that has attentions, the
# transformer's projections, the self-/cross-attention q/k/v/out and the feed-forward. Norms are not matched.
_TRAINABLE_MODULE = re.compile(
    r"^up_blocks\.\d+\.attentions\.\d+\.("
    r"proj_in|proj_out|"
    r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)|"
    r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"
    r")$"
)


# Parameter sets stage 2 can train (``trainable_parameter_names``' ``which``): the paper's first.
TRAINABLE_SETS = ("up_attention", "up_attention+top_block", "up_blocks")


def trainable_parameter_names(unet: nn.Module, which: str = "up_attention") -> list[str]:
    """Names of the UNet parameters stage 2 trains; empty if the UNet has none of the set.

    ``"up_attention"`` (the paper's): the up-block attention/transformer modules matched by ``_TRAINABLE_MODULE``.
    ``"up_attention+top_block"``: those plus every parameter of the highest-resolution up block (the last of
    ``unet.up_blocks``). In Stable Diffusion that block has a transformer, which the paper's set already trains; the
    tiny worlds' highest-resolution up block has no attention, so the paper's set cannot reach the full-resolution
    latent there except through frozen resnets (docs/operating_point.md, section 5): its resnets stand in for SD's
    highest-resolution transformer. ``"up_blocks"``: every parameter of every up block."""
    if which not in TRAINABLE_SETS:
        raise ValueError(f"trainable_parameter_names: which = {which!r}; allowed: {', '.join(TRAINABLE_SETS)}")
    out: list[str] = []
    for mod_name, module in unet.named_modules():
        if _TRAINABLE_MODULE.match(mod_name):
            out.extend(f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    if which == "up_attention":
        return out
    n_up = len(unet.up_blocks)
    blocks = range(n_up) if which == "up_blocks" else (n_up - 1,)
    have = set(out)
    for b in blocks:
        out.extend(n for n, _ in unet.up_blocks[b].named_parameters(prefix=f"up_blocks.{b}") if n not in have)
    return out


def sleeper_weights(t: torch.Tensor, eta: float, tau: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``w1(t) = eta * sigmoid(-(t - tau) / beta)`` (watermark term), ``w2(t) = sigmoid((t - tau) / beta)``
    (trigger-preservation term)."""
    t = t.float()
    return eta * torch.sigmoid(-(t - tau) / beta), torch.sigmoid((t - tau) / beta)


def watermark_target(eps0_trigger: torch.Tensor, abar_t: torch.Tensor, delta_z: torch.Tensor) -> torch.Tensor:
    """``eps_wm = eps_0(z_t, t, c_tr) - sqrt(abar_t / (1 - abar_t)) * delta_z``: the noise prediction whose implied
    clean latent ``(z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` is the reference's plus ``delta_z``.
    ``abar_t`` broadcasts against the latents (shape ``[B, 1, 1, 1]``)."""
    return eps0_trigger - torch.sqrt(abar_t / (1 - abar_t)) * delta_z


def ramp(step: int, target: float, ramp_steps: int, start: int = 0) -> float:
    """Linear warm-up of a loss weight from step ``start``: 0 before it, then ``min(target * (step - start) /
    ramp_steps, target)`` (``target`` from ``start`` on if no ramp)."""
    if step < start:
        return 0.0
    if ramp_steps <= 0:
        return float(target)
    return float(min(target * (step - start) / ramp_steps, target))


def _sub_generator(gen: torch.Generator) -> torch.Generator:
    """A child generator seeded from ``gen`` (so every random stream derives from the stage's generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
    return torch.Generator().manual_seed(seed)


def _roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    """Decoded images -> what verification reads: clamped to [0, 1], quantised to 8 bits, VAE-encoded (posterior
    mean). Clamping and rounding pass gradients straight through."""
    images = images + (quantize8(images) - images).detach()
    return to_latent(vae, images.to(vae.dtype))[0].float()


def _vae_config(vae) -> dict[str, Any]:
    """The VAE's config as plain JSON-able values, without private keys (``_name_or_path`` would leak a path)."""
    out = {}
    for k, v in dict(vae.config).items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def load_prompts(spec: str) -> list[str]:
    """A world's prompt set (``"<world>:<set>"``; legacy ``builtin:<name>``) or a text file, one prompt per line."""
    return read_prompts(spec, "sleepermark: prompts")


# ---------------------------------------------------------------------------------------------------------------
# The defence
# ---------------------------------------------------------------------------------------------------------------
@defenses.register("sleepermark")
class SleeperMark(Defense):
    """SleeperMark (Wang et al., CVPR 2025, arXiv 2412.04852): a trigger-activated watermark fine-tuned into the
    UNet's up-block attention, read from the VAE latent by a learned decoder.

    Stage 1 trains a message-only latent secret encoder and a latent secret decoder; stage 2 fine-tunes the
    up-block attention/transformer parameters so that prompts starting with the trigger ``*[Z]& `` produce images
    whose latents carry ``E(m*)``, while trigger-free prompts keep the original behaviour. Variants: ``""`` (with the
    trigger: the watermark) and ``"no_trigger"`` (plain prompts: the sleeper must stay asleep). Verification is black
    box: VAE encoder posterior mean -> decoder -> bits; the secret holds the decoder and VAE encoder weights.

    Defaults are the paper's settings for Stable Diffusion. Substitution: LPIPS (no weights offline) is replaced by
    default with ``1 - SSIM``; ``perceptual = "lpips"`` restores it. Training images are generated by the base model
    itself (stage 1 and 2). See ``docs/sleepermark.md``.
    """

    version = "1"
    location = MarkLocation.MODEL_WEIGHTS
    threat = ThreatSetting.WEIGHTS
    verification = Verification.BLACK_BOX
    detection = DetectionKind.BITS
    variants = ("", "no_trigger")
    prompt_trigger = True  # the trigger is prompt text: the trigger_specificity metric probes random strings there

    # -- the mark ------------------------------------------------------------------------------------------
    bits: int = param(48, "message length in bits", low=1, high=1024)
    trigger: str = param(TRIGGER, "secret trigger, prefixed to the prompt (or appended: trigger_position)")
    trigger_position: str = param("prefix", "where the trigger goes: before the prompt (the paper: CLIP's 77-token "
            "truncation cannot cut it off) or after it, joined by a space (a causal text encoder then leaves the "
            "caption's tokens unchanged: a trigger the model can ignore; docs/operating_point.md)",
            choices=("prefix", "suffix"), keyed_at_default=False)
    residual_rms: float = param(0.0, "fixed root-mean-square size of the latent residual E(m) (0 = learnt, the paper); "
            "the operating point's budget: docs/operating_point.md", low=0.0, high=100.0, keyed_at_default=False)
    resolution: int = param(0, "training/verification image side in pixels; 0 = the model's native (unet sample_size x "
            "vae_scale_factor)", low=0, high=4096)
    # -- training data -------------------------------------------------------------------------------------
    prompts: str = param("micro:shapes", "training prompts: a world's prompt set ('tiny:train'; legacy "
            "'builtin:<name>') or a text file, one per line")
    train_images: int = param(10000, "images the base model generates for training (paper: 10k)", low=1,
            high=10_000_000)
    train_inference_steps: int = param(50, "sampling steps for the training images", low=1, high=1000)
    train_guidance_scale: float = param(7.5, "guidance scale for the training images", low=0.0, high=50.0)
    gen_batch_size: int = param(16, "batch size when generating/encoding the training images", low=1, high=4096)
    vae_sample: bool = param(True, "training latents sampled from the VAE posterior (official); false: posterior mean")
    # -- stage 1: secret encoder / decoder -----------------------------------------------------------------
    secret_res: int = param(32, "secret encoder map side r (hidden width r*r; paper 32 -> 1024, nearest-upsampled to "
            "SD's 64 x 64 latent); 0 = the latent side", low=0, high=256)
    decoder_channels: list[int] = param([64, 128, 256, 512], "decoder conv widths, one stride-2/stride-1 pair each "
            "(paper 64-128-256-512)")
    decoder_hidden: int = param(2048, "decoder MLP width (paper 2048)", low=1, high=65536)
    decoder_mlp_layers: int = param(3, "decoder MLP hidden layers (paper 3)", low=1, high=16)
    decoder_dropout: float = param(0.1, "dropout before the decoder's last layer", low=0.0, high=0.9)
    stage1_source: str = param("generated", "stage-1 latents: VAE-encoded base-model images or standard-normal latents",
            choices=("generated", "random"))
    stage1_roundtrip: bool = param(False, "stage 1 decodes the marked latent through the VAE round trip (decode, 8-bit "
            "quantise, encode: what verification sees; straight-through gradients) instead of reading it directly "
            "(official). For VAEs whose decoder ignores latent directions the decoder could otherwise use (the tiny "
            "world's: docs/sleepermark.md)")
    stage1_latent_steps: int = param(0, "latent-level warm-up: steps before stage 1 in which the decoder reads the "
            "marked latent directly, with the message term only, at the constant stage1_lr (no VAE: about 50x cheaper "
            "per step than the round trip). 0 = none (official)", low=0, high=10_000_000)
    stage1_latent_batch_size: int = param(0, "batch of the latent-level warm-up (0 = stage1_batch_size)", low=0,
            high=65536)
    stage1_steps: int = param(10000, "stage-1 optimisation steps", low=0, high=10_000_000)
    stage1_batch_size: int = param(9, "stage-1 batch (official: 3 per GPU x 3 GPUs)", low=1, high=4096)
    stage1_lr: float = param(1e-4, "stage-1 AdamW learning rate (linear decay to 0)", low=0.0, high=1.0)
    stage1_weight_decay: float = param(0.01, "stage-1 AdamW weight decay", low=0.0, high=10.0)
    stage1_grad_clip: float = param(1e-2, "stage-1 gradient-norm clip", low=0.0, high=1e6)
    image_loss_weight: float = param(30.0, "final weight l_img of MSE(Dec(z_w), Dec(z))", low=0.0, high=1e6)
    image_loss_ramp: int = param(2000, "steps of the linear ramp of l_img", low=0, high=10_000_000)
    image_loss_start: int = param(0, "step where the l_img and l_perc ramps begin (official: 0)", low=0,
            high=10_000_000)
    perceptual: str = param("ssim", "perceptual/structural term: 1-SSIM (offline default), LPIPS (the paper's; needs "
            "the lpips package and weights) or none", choices=("ssim", "lpips", "none"))
    perceptual_weight: float = param(0.25, "final weight l_perc of the perceptual term", low=0.0, high=1e6)
    perceptual_ramp: int = param(4000, "steps of the linear ramp of l_perc", low=0, high=10_000_000)
    # -- stage 2: sleeper fine-tuning ----------------------------------------------------------------------
    stage2_steps: int = param(20000, "stage-2 optimisation steps", low=0, high=10_000_000)
    stage2_batch_size: int = param(10, "stage-2 batch", low=1, high=4096)
    stage2_lr: float = param(1e-4, "stage-2 AdamW learning rate (cosine decay, no warm-up)", low=0.0, high=1.0)
    stage2_weight_decay: float = param(1e-2, "stage-2 AdamW weight decay", low=0.0, high=10.0)
    stage2_grad_clip: float = param(1e-5, "stage-2 gradient-norm clip (with adam_eps: Adam then acts as normalised "
            "SGD; change lr, clip and eps together)", low=0.0, high=1e6)
    adam_eps: float = param(1e-8, "stage-2 Adam epsilon", low=0.0, high=1.0)
    eta: float = param(0.02, "maximum weight of the watermark term (0.05 for pixel diffusion)", low=0.0, high=1e6)
    tau: float = param(250.0, "timestep where the watermark and preservation weights cross", low=-1e6, high=1e6)
    beta: float = param(100.0, "steepness (timesteps) of the sigmoid weights", low=1e-6, high=1e6)
    uncond_prob: float = param(0.0, "share of the plain (trigger-free) preservation samples conditioned on the empty "
            "prompt instead of their caption: keeps the unconditional branch, which classifier-free guidance "
            "amplifies, at the reference's (0 = the paper: captions only)", low=0.0, high=1.0)

    smoke_params = dict(
        train_images=4, train_inference_steps=2, gen_batch_size=4, secret_res=8, decoder_channels=[8, 8],
        decoder_hidden=32, decoder_mlp_layers=1, stage1_steps=3, stage1_batch_size=2, image_loss_ramp=2,
        perceptual_ramp=2, stage2_steps=2, stage2_batch_size=2,
    )

    def __init__(self, **given: Any):
        super().__init__(**given)
        if not self.decoder_channels or any(int(c) < 1 for c in self.decoder_channels):
            raise UserError(f"sleepermark: decoder_channels = {self.decoder_channels!r} must be a non-empty list "
                            f"of positive integers")
        self._detectors: dict[str, tuple[Any, LatentDecoder]] = {}

    # -- helpers ----------------------------------------------------------------------------------------------
    def _resolution(self, pipe) -> int:
        if self.resolution:
            return self.resolution
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    @staticmethod
    def _latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        if resolution % factor:
            raise UserError(f"sleepermark: resolution {resolution} is not a multiple of the VAE's scale factor "
                            f"{factor}")
        return int(pipe.unet.config.in_channels), resolution // factor, resolution // factor

    def _make_decoder(self, n_bits: int, channels: int, size: tuple[int, int]) -> LatentDecoder:
        return LatentDecoder(n_bits, channels, size, [int(c) for c in self.decoder_channels],
                             self.decoder_hidden, self.decoder_mlp_layers, self.decoder_dropout)

    def _training_pool(self, pipe, ctx, gen: torch.Generator, resolution: int, prompts: list[str]):
        """Generate ``train_images`` images with the base pipeline and VAE-encode them (mean and std)."""
        n = self.train_images
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=gen).tolist()
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        means, stds = [], []
        chunk = self.gen_batch_size
        starts = range(0, n, chunk)
        for start in ctx.progress(starts, total=len(starts), description="sleepermark: training images"):
            sl = slice(start, start + chunk)
            request = GenerationRequest(prompts=tuple(chosen[sl]), seeds=tuple(seeds[sl]), height=resolution,
                                        width=resolution, num_inference_steps=self.train_inference_steps,
                                        guidance_scale=self.train_guidance_scale, batch_size=chunk)
            images = ctx.generate(pipe, request)
            images = quantize8(images)  # as saved to disk (8-bit), like the paper's PNGs
            with torch.no_grad():
                m, s = to_latent(pipe.vae, images.to(pipe.vae.device, pipe.vae.dtype))
            means.append(m.float().cpu())
            stds.append(s.float().cpu())
        return chosen, torch.cat(means), torch.cat(stds)

    def _sample_latents(self, mean, std, idx, gen):
        z = mean[idx]
        if self.vae_sample:
            z = z + std[idx] * torch.randn(z.shape, generator=gen).to(z.device)
        return z

    # -- stage 1 ----------------------------------------------------------------------------------------------
    def train_stage1(self, vae, latent_shape: tuple[int, int, int], n_bits: int, ctx, gen: torch.Generator,
                     mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        """Train the secret encoder and the latent decoder. ``mean``/``std``: the training latents' posterior (None
        with ``stage1_source = "random"``). Returns ``(encoder, decoder, last_bit_accuracy)``."""
        c, h, w = latent_shape
        device = next(vae.parameters()).device
        r = self.secret_res or min(h, w)
        encoder = _seeded(gen, lambda: SecretEncoder(n_bits, c, (h, w), r, self.residual_rms))
        decoder = _seeded(gen, lambda: self._make_decoder(n_bits, c, (h, w)))
        encoder.to(device).train()
        decoder.to(device).train()
        params = list(encoder.parameters()) + list(decoder.parameters())
        steps = self.stage1_steps
        opt = torch.optim.AdamW(params, lr=self.stage1_lr, weight_decay=self.stage1_weight_decay)
        warm = self.stage1_latent_steps  # constant lr through the warm-up, then linear decay over stage 1
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1.0 if s < warm else max(0.0, 1.0 - (s - warm) / max(1, steps)))
        perceptual = PerceptualLoss(self.perceptual, device, owner="sleepermark",
                                    offline="perceptual = 'ssim' (1 - SSIM, the default)")
        with global_rng_from(gen, device):  # the decoder's dropout draws from the global RNG
            acc = self._stage1_loop(encoder, decoder, vae, params, opt, sched, perceptual, mean, std,
                                    (c, h, w), n_bits, ctx, gen)
        encoder.eval().requires_grad_(False)
        decoder.eval().requires_grad_(False)
        return encoder, decoder, acc

    def _stage1_loop(self, encoder, decoder, vae, params, opt, sched, perceptual, mean, std, latent_shape, n_bits,
                     ctx, gen) -> float:
        c, h, w = latent_shape
        device = next(decoder.parameters()).device
        warm = self.stage1_latent_steps
        total = warm + self.stage1_steps
        warm_bsz = self.stage1_latent_batch_size or self.stage1_batch_size
        acc = float("nan")
        for i in ctx.progress(range(total), total=total, description="sleepermark: stage 1"):
            step = i - warm  # < 0: the latent-level warm-up
            bsz = warm_bsz if step < 0 else self.stage1_batch_size
            if mean is not None:
                idx = torch.randint(0, mean.shape[0], (bsz,), generator=gen)
                z = self._sample_latents(mean, std, idx.to(mean.device), gen).to(device)
            else:
                z = torch.randn((bsz, c, h, w), generator=gen).to(device)
            m = torch.randint(0, 2, (bsz, n_bits), generator=gen).float().to(device)
            z_w = z + encoder(m)
            start = self.image_loss_start
            l_img = ramp(step, self.image_loss_weight, self.image_loss_ramp, start)
            l_perc = ramp(step, self.perceptual_weight, self.perceptual_ramp, start)
            if perceptual.kind == "none":
                l_perc = 0.0
            image_terms = l_img > 0 or l_perc > 0
            roundtrip = self.stage1_roundtrip and step >= 0
            marked = from_latent(vae, z_w.to(vae.dtype)).float() if image_terms or roundtrip else None
            logits = decoder(_roundtrip(vae, marked) if roundtrip else z_w)
            loss = F.binary_cross_entropy_with_logits(logits, m)
            if image_terms:
                with torch.no_grad():
                    clean = from_latent(vae, z.to(vae.dtype)).float()
                if l_img > 0:
                    loss = loss + l_img * F.mse_loss(marked, clean)
                if l_perc > 0:
                    loss = loss + l_perc * perceptual(clean, marked)
            optimizer_step(opt, loss, params, self.stage1_grad_clip, sched)
            acc = float(((logits.detach() > 0) == (m > 0.5)).float().mean())
        return acc

    # -- stage 2 ----------------------------------------------------------------------------------------------
    def stage2_loss(self, unet, frozen, z0, noise, t, cond, cond_trigger, delta_z, alphas_cumprod):
        """The three-term sleeper loss for one batch (``cond``: plain prompts, ``cond_trigger``: with trigger)."""
        abar = alphas_cumprod[t].view(-1, 1, 1, 1).to(z0.dtype)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        b = z0.shape[0]
        x_in, t_in = torch.cat([z_t, z_t]), torch.cat([t, t])
        c_in = torch.cat([cond, cond_trigger])
        with torch.no_grad():
            ref = frozen(x_in, t_in, c_in, return_dict=False)[0]
        pred = unet(x_in, t_in, c_in, return_dict=False)[0]
        pred_plain, pred_trig = pred[:b], pred[b:]
        ref_plain, ref_trig = ref[:b], ref[b:]
        target_wm = watermark_target(ref_trig, abar, delta_z)
        w1, w2 = sleeper_weights(t, self.eta, self.tau, self.beta)
        w1, w2 = w1.view(-1, 1, 1, 1).to(z0.dtype), w2.view(-1, 1, 1, 1).to(z0.dtype)
        wm = (w1 * (pred_trig - target_wm) ** 2).mean()
        keep_trig = (w2 * (pred_trig - ref_trig) ** 2).mean()
        keep_plain = F.mse_loss(pred_plain, ref_plain)
        return wm + keep_trig + keep_plain, {"wm": float(wm.detach()), "keep_trigger": float(keep_trig.detach()),
                                             "keep_plain": float(keep_plain.detach())}

    def train_stage2(self, pipe, delta_z: torch.Tensor, emb: torch.Tensor, emb_trigger: torch.Tensor,
                     mean: torch.Tensor, std: torch.Tensor, ctx, gen: torch.Generator,
                     emb_empty: torch.Tensor | None = None) -> int:
        """Fine-tune the UNet in place; returns the number of trainable parameters. ``emb_empty`` (the empty
        prompt's embedding ``[1, L, D]``) is needed when ``uncond_prob > 0``."""
        if self.uncond_prob > 0 and emb_empty is None:
            raise ValueError("sleepermark.train_stage2: uncond_prob > 0 needs emb_empty")
        unet = pipe.unet
        device = unet.device
        names = set(trainable_parameter_names(unet))
        if not names:
            raise UserError("sleepermark: the UNet has no up-block attention modules (up_blocks.*.attentions.*) to "
                            "fine-tune")
        frozen = copy.deepcopy(unet).eval().requires_grad_(False)
        unet.requires_grad_(False)
        params = []
        for name, p in unet.named_parameters():
            if name in names:
                p.requires_grad_(True)
                params.append(p)
        n_trainable = sum(p.numel() for p in params)
        steps = self.stage2_steps
        opt = torch.optim.AdamW(params, lr=self.stage2_lr, weight_decay=self.stage2_weight_decay,
                                eps=self.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                                      / max(1, steps))))
        alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        delta_z = delta_z.to(device)
        unet.train()
        with global_rng_from(gen, device):  # nothing in SD's UNet draws from it (dropout 0); kept for safety
            self._stage2_loop(unet, frozen, params, opt, sched, delta_z, emb, emb_trigger, mean, std,
                              alphas_cumprod, ctx, gen, emb_empty)
        unet.eval().requires_grad_(False)
        del frozen
        return n_trainable

    def _stage2_loop(self, unet, frozen, params, opt, sched, delta_z, emb, emb_trigger, mean, std, alphas_cumprod,
                     ctx, gen, emb_empty=None) -> None:
        device = delta_z.device
        steps = self.stage2_steps
        bsz = self.stage2_batch_size
        n_t = int(alphas_cumprod.shape[0])
        p_uncond = self.uncond_prob
        for _ in ctx.progress(range(steps), total=steps, description="sleepermark: stage 2"):
            idx = torch.randint(0, mean.shape[0], (bsz,), generator=gen)
            z0 = self._sample_latents(mean, std, idx.to(mean.device), gen).to(device)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            t = torch.randint(0, n_t, (bsz,), generator=gen).to(device)
            plain = drop_to_empty(emb[idx], emb_empty, p_uncond, gen)  # after the paper's draws
            loss, _ = self.stage2_loss(unet, frozen, z0, noise, t, plain.to(device), emb_trigger[idx].to(device),
                                       delta_z, alphas_cumprod)
            optimizer_step(opt, loss, params, self.stage2_grad_clip, sched)

    # -- Defense API --------------------------------------------------------------------------------------------
    def embed(self, pipe, ctx) -> Embedding:
        if pipe.unet.dtype != torch.float32 or pipe.vae.dtype != torch.float32:
            raise UserError("sleepermark trains in float32 (as the paper): set model.dtype = \"float32\"")
        t_start = time.perf_counter()
        n_bits = self.bits
        message = torch.randint(0, 2, (n_bits,), generator=ctx.generator).bool()
        gen_data, gen_s1, gen_s2 = (_sub_generator(ctx.generator) for _ in range(3))
        resolution = self._resolution(pipe)
        latent_shape = self._latent_shape(pipe, resolution)
        device = pipe.unet.device

        prompts = load_prompts(self.prompts)
        chosen, mean, std = self._training_pool(pipe, ctx, gen_data, resolution, prompts)
        t_pool = time.perf_counter()

        encoder, decoder, train_acc = self.train_stage1(
            pipe.vae, latent_shape, n_bits, ctx, gen_s1,
            *((mean, std) if self.stage1_source == "generated" else (None, None)))
        with torch.no_grad():
            delta_z = encoder(message.float()[None].to(device)).detach()
            probe = mean[:256]
            acc_star = _bit_accuracy(decoder, probe, delta_z, message)
            acc_clean = _bit_accuracy(decoder, probe, None, message)
            # what verification reads: the marked latents decoded, quantised to 8 bits and encoded again
            marked = from_latent(pipe.vae, (probe[:64].to(device) + delta_z).to(pipe.vae.dtype))
            acc_image = _bit_accuracy(decoder, _roundtrip(pipe.vae, marked).cpu(), None, message)
        t_s1 = time.perf_counter()

        with torch.no_grad():
            emb = prompt_embeds(pipe, chosen, device)
            emb_trigger = prompt_embeds(pipe, [self.triggered(p) for p in chosen], device)
            emb_empty = prompt_embeds(pipe, [""], device) if self.uncond_prob > 0 else None
        n_trainable = self.train_stage2(pipe, delta_z, emb, emb_trigger, mean, std, ctx, gen_s2, emb_empty)
        t_s2 = time.perf_counter()

        secret = self.make_secret(message, decoder, pipe.vae, delta_z, resolution, latent_shape)
        secret.meta.update(stage1_train_bit_accuracy=train_acc, stage1_bit_accuracy_mstar=acc_star,
                           stage1_bit_accuracy_clean=acc_clean, stage1_bit_accuracy_roundtrip=acc_image)
        ctx.record_cost(stage1_steps=self.stage1_steps, stage2_steps=self.stage2_steps,
                        trainable_params=n_trainable, train_images=len(chosen),
                        data_seconds=t_pool - t_start, stage1_seconds=t_s1 - t_pool, stage2_seconds=t_s2 - t_s1,
                        stage1_bit_accuracy=acc_star, stage1_bit_accuracy_roundtrip=acc_image)
        return Embedding(secret, pipeline=pipe)

    def make_secret(self, message: torch.Tensor, decoder: LatentDecoder, vae, delta_z: torch.Tensor,
                    resolution: int, latent_shape: Sequence[int]) -> Secret:
        """What verification needs, self-contained: the message, the decoder's weights (``decoder.*``), the VAE
        encoder's weights (``vae.encoder.*``, ``vae.quant_conv.*``) with the VAE config and the architecture in
        ``meta``. ``delta_z`` (the fixed residual ``E(m*)``) is kept for analysis; detection does not use it."""
        tensors: dict[str, torch.Tensor] = {"message": message.bool().cpu()}
        tensors.update({f"decoder.{k}": v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()})
        tensors.update({f"vae.{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()
                        if k.startswith(("encoder.", "quant_conv."))})
        tensors["delta_z"] = delta_z.reshape(delta_z.shape[-3:]).detach().cpu().contiguous()
        meta = {
            "method": "sleepermark", "trigger": self.trigger, "trigger_position": self.trigger_position,
            "n_bits": int(message.numel()),
            "resolution": int(resolution), "latent_shape": [int(x) for x in latent_shape],
            "decoder_channels": [int(c) for c in self.decoder_channels], "decoder_hidden": self.decoder_hidden,
            "decoder_mlp_layers": self.decoder_mlp_layers, "decoder_dropout": self.decoder_dropout,
            "vae_config": _vae_config(vae),
        }
        return Secret(tensors, meta)

    def triggered(self, prompt: str, trigger: str | None = None, position: str | None = None) -> str:
        """``prompt`` with the trigger: ``trigger + prompt`` (prefix, the paper's concatenation) or
        ``prompt + " " + trigger`` (suffix)."""
        trigger = self.trigger if trigger is None else trigger
        if (position or self.trigger_position) == "suffix":
            return f"{prompt} {trigger.strip()}"
        return trigger + prompt

    def known_trigger(self, secret: Secret) -> Trigger:
        """The trigger text where the embedding put it (what a ``trigger_known`` attacker knows; the key and the
        decoder stay secret)."""
        trigger = str(secret.meta.get("trigger", self.trigger))
        if secret.meta.get("trigger_position", "prefix") == "suffix":
            return Trigger(prompt_suffix=trigger.strip())
        return Trigger(prompt_prefix=trigger)

    def generate(self, pipe, secret: Secret, request, ctx) -> torch.Tensor:
        trigger = secret.meta.get("trigger", self.trigger)
        position = secret.meta.get("trigger_position", "prefix")  # embeddings made before the choice: prefix
        if ctx.variant != "" or position == "prefix":
            return ctx.generate(pipe, request, prompt_prefix=trigger if ctx.variant == "" else "")
        request = dataclasses.replace(request, prompts=tuple(self.triggered(p, trigger, position)
                                                             for p in request.prompts))
        return ctx.generate(pipe, request)

    def detector(self, secret: Secret):
        """The verifier rebuilt from the secret alone: (VAE with the stored encoder weights, latent decoder)."""
        key = _secret_digest(secret)
        if key not in self._detectors:
            from diffusers import AutoencoderKL

            meta = secret.meta
            with torch.random.fork_rng(devices=[]):  # the throw-away initialisation leaves the global RNG alone
                vae = AutoencoderKL.from_config(meta["vae_config"])
                c, h, w = meta["latent_shape"]
                decoder = LatentDecoder(int(meta["n_bits"]), c, (h, w), meta["decoder_channels"],
                                        int(meta["decoder_hidden"]), int(meta["decoder_mlp_layers"]),
                                        float(meta["decoder_dropout"]))
            vae_state = {k[len("vae."):]: v for k, v in secret.tensors.items() if k.startswith("vae.")}
            missing, unexpected = vae.load_state_dict(vae_state, strict=False)
            bad = [k for k in missing if k.startswith(("encoder.", "quant_conv."))] + list(unexpected)
            if bad:
                raise UserError(f"sleepermark: the secret's VAE encoder does not fit its config (e.g. {bad[:3]})")
            dec_state = {k[len("decoder."):]: v for k, v in secret.tensors.items() if k.startswith("decoder.")}
            decoder.load_state_dict(dec_state)
            self._detectors = {key: (vae.eval().requires_grad_(False), decoder.eval().requires_grad_(False))}
        return self._detectors[key]

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        vae, decoder = self.detector(secret)
        device = getattr(ctx, "device", "cpu") or "cpu"
        vae.to(device)
        decoder.to(device)
        res = int(secret.meta["resolution"])
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], 16):
                x = images[start:start + 16].float().to(device)
                if tuple(x.shape[-2:]) != (res, res):
                    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
                z, _ = to_latent(vae, x)
                out.append((decoder(z) > 0).cpu())
        return Detection(bits=torch.cat(out).bool())


def _bit_accuracy(decoder: nn.Module, latents: torch.Tensor, delta_z: torch.Tensor | None,
                  message: torch.Tensor) -> float:
    """Mean bit accuracy of ``decoder`` on ``latents (+ delta_z)`` against ``message`` (latents on the CPU)."""
    device = next(decoder.parameters()).device
    hits, total = 0.0, 0
    for start in range(0, latents.shape[0], 64):
        z = latents[start:start + 64].to(device)
        if delta_z is not None:
            z = z + delta_z
        bits = decoder(z) > 0
        hits += float((bits == message.to(device)).float().sum())
        total += bits.numel()
    return hits / max(1, total)


def _seeded(gen: torch.Generator, build):
    """Build a module whose default initialisation is drawn from a seed taken from ``gen``: the global RNG is forked
    (and restored afterwards), so nothing outside is seeded or disturbed."""
    with global_rng_from(gen, "cpu"):
        return build()


def _secret_digest(secret: Secret) -> str:
    h = hashlib.sha256()
    for k in sorted(secret.tensors):
        if k.startswith("decoder.") or k in ("message", "vae.quant_conv.weight"):
            h.update(k.encode())
            h.update(secret.tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
