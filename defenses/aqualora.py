"""AquaLoRA: a watermark LoRA merged into the UNet of a latent diffusion model (white-box protection).

Feng, Zhou, He, Zhang, Wei, Li, Zhang, Zhang and Yu, "AquaLoRA: Toward White-box Protection for Customized Stable
Diffusion Models via Watermark LoRA", ICML 2024, arXiv 2405.11135 (official code: Georgefwt/AquaLoRA, consulted for
facts only; this file is written afresh).

Everything runs in :meth:`AquaLoRA.embed` on the pipeline under test:

1. **Latent watermark pre-training.** A message-only secret encoder ``E(m)`` (``Linear(n_bits, r*r)`` + SiLU, an
   ``r x r`` map repeated over the latent channels, resized to the latent, a zero-initialised 3x3 convolution;
   :class:`bench.latent_nets.SecretEncoder` with one linear layer) gives a residual in the VAE's *unscaled*
   latent space (as the official code). The marked image is ``Dec(z + E(m))``; an image decoder (EfficientNet-B1
   at 512 px with a ``2 * n_bits`` head read as two-class logits per bit, or a small conv decoder) reads the bits
   after a random distortion (identity, JPEG, crop-and-resize, blur, noise, colour jitter)::

       L = BCE(D(T(Dec(z + E(m)))), onehot(m)) + l_p * P(Dec(z), Dec(z_w)) + l_r * PRVL(Dec(z), Dec(z_w))

   with the official schedule: a warm-up on the latent of a zero image with the residual scaled by 0.03 and the
   message loss alone, until the mean message loss of the last 10 steps is below 0.1; then the message loss alone,
   ``+ 1 * P`` from ``perceptual_start``, ``5 * P + 1.5 * PRVL`` from ``full_loss_start``; milder distortions
   (identity 0.6 / crop 0.4) before ``distortion_start``; with probability 1/4 per batch the residual is "cornerfied"
   (its quadrants moved to the corners of a canvas 1-2x larger, resized back). ``PRVL`` (peak regional variation) is
   the largest mean absolute difference over ``prvl_window``-pixel windows. Every sample carries its own message.
2. **Prior-preserving fine-tuning (PPFT).** A LoRA on every transformer of the UNet (``proj_in``, ``proj_out``,
   ``attn1``/``attn2`` ``to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``, ``ff.net.2``; rank 320) whose product is
   scaled per message by a diagonal ``s(m)`` from a mapper (an orthogonally initialised ``n_bits x rank`` embedding:
   ``s(m) = sum_i m_i e_i / sqrt(n_bits) + 1``): ``y = W x + up(diag(s(m)) down(x))``. With ``t`` uniform, one noise
   ``eps`` and per-sample random messages::

       L = | eps_LoRA(q(z0 + E'(m), t, eps), t, c; s(m)) - eps_0(q(z0, t, eps), t, c) |^2,   E'(m) = sf * E(m)

   ``sf`` is the VAE's ``scaling_factor``, ``eps_0`` the same UNet with the LoRA off (the frozen base), ``q`` the
   forward diffusion, ``c`` the caption's text embedding; v-prediction models compare the implied noises, as the
   official code. The LoRA and the mapper train; the encoder and decoder are frozen.
3. **Decoder robustness fine-tuning** (optional, ``robust_steps > 0``): the LoRA model (random messages, the diagonal
   times ``lora_scale``) generates images at random sizes; only the decoder trains, on those images after milder
   distortions.
4. **Baking and merging.** The message ``m*`` (the first draw of the stage's generator) gives ``diag(s(m*)) *
   lora_scale``; every LoRA is folded into its base weight (``W + up diag(s) down``) and removed: the deployed model is
   a plain pipeline whose UNet weights differ from the base's.

Verification (black box): the image decoder on the image (resized to ``decoder_input_size``), bit ``i`` is 1 iff its
class-1 logit exceeds its class-0 logit; the harness turns bits into bit accuracy and a binomial TPR at its FPRs.

Substitutions (see ``docs/aqualora.md``):

* **Perceptual term.** The official code uses LPIPS (VGG), whose weights cannot be fetched offline: the default
  ``perceptual = "ssim"`` uses ``1 - SSIM``; ``"lpips"`` (AlexNet LPIPS, via :class:`bench.training.PerceptualLoss`)
  where the package and its weights are installed; ``"none"``.
* **Decoder weights.** EfficientNet-B1 starts from random weights (``weights=None``; the official code starts from
  ImageNet weights, which cannot be downloaded here).
* **Training data.** Offline, both stages use images the base model generates itself for ``prompts`` (or a dataset
  through ``ctx.data``): the official code uses 10k COCO 2017 images (stage 1) and a set of SD prompts with images
  (stage 2).
* **JPEG.** A differentiable approximation (``jpeg_mode``: HiDDeN's JPEG-Mask by default, as the official code,
  but keeping the 5x5 / 3x3 lowest DCT frequencies rather than the first 25 / 9 in zig-zag order; kornia's
  differentiable codec; or the real codec straight-through), from :mod:`defenses.hidden`.
* **Cover augmentation.** The official stage 1 flips / rotates (by 90 degrees) half of its cover images; the
  covers here are VAE-encoded once, so this is left out.
* **Precision.** Everything in float32 (the official PPFT runs the frozen weights in fp16).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from markbench import (Defense, Detection, DetectionKind, Embedding, GenerationRequest, MarkLocation, Secret,
                       ThreatSetting, UserError, Verification, param, read_prompts)
from markbench.registries import defenses
from markbench.latent_nets import LatentDecoder, SecretEncoder
from markbench.latents import from_latent, to_latent
from markbench.noise import JPEG_MODES, jpeg, quantize8
from markbench.packing import digest, load_prefixed, state_tensors
from markbench.rng import global_rng_from, seeded, sub_generator
from markbench.training import PerceptualLoss, optimizer_step, prompt_embeds

#: The distortions of the decoder's training, in the order of the probability lists.
DISTORTIONS = ("identity", "jpeg", "crop", "blur", "noise", "jitter")

# Every transformer of the UNet (down, mid and up blocks): the modules the watermark LoRA wraps. On SD 1.x these are
# the official list's 192 modules (16 transformers x 12).
_TARGET_MODULE = re.compile(
    r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.("
    r"proj_in|proj_out|"
    r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)|"
    r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"
    r")$"
)


# ---------------------------------------------------------------------------------------------------------------
# The message-scaled LoRA
# ---------------------------------------------------------------------------------------------------------------
class DiagState:
    """What the LoRA layers of one UNet read: ``diag`` is None (LoRA off: the base model) or the diagonal ``s(m)``,
    ``[rank]`` (one message) or ``[B, rank]`` (one per sample; repeated when the batch is a multiple, e.g. the
    doubled batch of classifier-free guidance)."""

    def __init__(self) -> None:
        self.diag: torch.Tensor | None = None

    @contextlib.contextmanager
    def use(self, diag: torch.Tensor | None):
        previous, self.diag = self.diag, diag
        try:
            yield
        finally:
            self.diag = previous


class MessageLoRA(nn.Module):
    """``y = base(x) + scale * up(diag(s) down(x))`` around a ``Linear`` or ``Conv2d`` ``base``.

    ``down`` has the base's input side (for a convolution: its kernel, stride, padding and dilation), ``up`` is a
    linear map (1x1 convolution) from ``rank``; ``down ~ N(0, 1/rank)``, ``up = 0`` (so the layer starts as the base).
    ``s`` comes from the shared :class:`DiagState`; with ``diag = None`` the layer is exactly the base.
    """

    def __init__(self, base: nn.Module, rank: int, state: DiagState, scale: float = 1.0):
        super().__init__()
        rank = int(rank)
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise UserError(f"aqualora: cannot wrap a grouped convolution ({base})")
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                  bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise UserError(f"aqualora: a LoRA wraps Linear or Conv2d modules, not {type(base).__name__}")
        self.base = base
        self.rank = rank
        self.scale = float(scale)
        self.state = state
        self.down.to(base.weight.device, base.weight.dtype)
        self.up.to(base.weight.device, base.weight.dtype)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects e.g. ``attn.to_q.weight.dtype`` sees the base
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x)
        diag = self.state.diag
        if diag is None:
            return out
        h = self.down(x.to(self.down.weight.dtype))
        d = diag.to(h.dtype)
        if d.dim() == 1:
            d = d.view(1, -1, 1, 1) if isinstance(self.down, nn.Conv2d) else d
        else:
            if h.shape[0] != d.shape[0]:
                if h.shape[0] % d.shape[0]:
                    raise ValueError(f"aqualora: a batch of {h.shape[0]} does not fit {d.shape[0]} diagonals")
                d = d.repeat(h.shape[0] // d.shape[0], 1)
            if isinstance(self.down, nn.Conv2d):
                d = d[:, :, None, None]
            else:
                d = d.view(d.shape[0], *([1] * (h.dim() - 2)), d.shape[1])
        return out + self.scale * self.up(h * d).to(out.dtype)

    def delta_weight(self, diag: torch.Tensor) -> torch.Tensor:
        """``scale * up diag(s) down`` as a weight of the base's shape (for one diagonal ``[rank]``)."""
        up = self.up.weight.reshape(self.up.weight.shape[0], self.rank).float() * diag.float().view(1, -1)
        down = self.down.weight.float()
        if isinstance(self.down, nn.Conv2d):
            return self.scale * torch.einsum("or,rikl->oikl", up, down)
        return self.scale * up @ down


def target_modules(unet: nn.Module) -> list[str]:
    """Names of the UNet modules the watermark LoRA wraps (see ``_TARGET_MODULE``): Linear/Conv2d modules only."""
    return [name for name, m in unet.named_modules()
            if _TARGET_MODULE.match(name) and isinstance(m, (nn.Linear, nn.Conv2d))]


class MessageLoRAModel:
    """A UNet with :class:`MessageLoRA` around each of ``target_modules(unet)`` (modified in place).

    ``state.use(diag)`` switches the LoRA on for a diagonal; :meth:`merge` folds one diagonal into the base weights
    and removes the wrappers, :meth:`remove` removes them unchanged.
    """

    def __init__(self, unet: nn.Module, rank: int, scale: float = 1.0, names: Sequence[str] | None = None):
        self.unet = unet
        self.state = DiagState()
        names = list(target_modules(unet) if names is None else names)
        if not names:
            raise UserError("aqualora: the UNet has no transformer modules (*.attentions.*) to put a LoRA on")
        self.layers: dict[str, MessageLoRA] = {}
        for name in names:
            parent, child = _parent(unet, name)
            layer = MessageLoRA(getattr(parent, child), rank, self.state, scale)
            setattr(parent, child, layer)
            self.layers[name] = layer

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.down.weight, layer.up.weight)]

    @torch.no_grad()
    def merge(self, diag: torch.Tensor) -> None:
        """``W <- W + scale * up diag(s) down`` for every wrapped module, then unwrap: a plain UNet remains."""
        if diag.dim() != 1:
            raise ValueError(f"aqualora: merging needs one diagonal [rank], got {tuple(diag.shape)}")
        for layer in self.layers.values():
            w = layer.base.weight
            w.copy_((w.float() + layer.delta_weight(diag.to(w.device))).to(w.dtype))
        self.remove()

    def remove(self) -> None:
        for name, layer in self.layers.items():
            parent, child = _parent(self.unet, name)
            setattr(parent, child, layer.base)
        self.layers = {}


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (root.get_submodule(path) if path else root), child


class Mapper(nn.Module):
    """Message -> LoRA diagonal: ``s(m) = sum_i m_i e_i / sqrt(n_bits) + 1`` (``m`` in {0, 1}).

    The ``n_bits x rank`` embedding is orthogonally initialised, each row then rescaled to standard deviation ``std``
    (the official ``MapperNet``).
    """

    def __init__(self, n_bits: int, rank: int, std: float = 1.0):
        super().__init__()
        self.n_bits = int(n_bits)
        weight = torch.empty(self.n_bits, int(rank))
        nn.init.orthogonal_(weight)
        if weight.shape[1] > 1:
            weight = weight / weight.std(dim=1, keepdim=True) * float(std)
        else:  # one column has no standard deviation: unit magnitude
            weight = torch.where(weight < 0, -1.0, 1.0) * float(std)
        self.embedding = nn.Parameter(weight)

    def forward(self, message: torch.Tensor) -> torch.Tensor:
        return message.float() @ self.embedding / math.sqrt(self.n_bits) + 1.0


# ---------------------------------------------------------------------------------------------------------------
# Stage-1 networks
# ---------------------------------------------------------------------------------------------------------------
class AquaSecretEncoder(SecretEncoder):
    """:class:`~bench.latent_nets.SecretEncoder` with the official single ``Linear(n_bits, r*r)`` + SiLU (the
    residual is in the VAE's unscaled latent space)."""

    def __init__(self, n_bits: int, latent_channels: int, latent_size: tuple[int, int], secret_res: int = 32):
        super().__init__(n_bits, latent_channels, latent_size, secret_res)
        width = self.secret_res * self.secret_res
        self.mlp = nn.Sequential(nn.Linear(n_bits, width), nn.SiLU())


class ImageDecoder(nn.Module):
    """Images in [0, 1] -> ``[B, n_bits, 2]`` two-class logits per bit (the official head); bit = argmax.

    ``arch = "efficientnet_b1"``: torchvision's EfficientNet-B1 (random weights) with its last linear layer replaced
    by ``Linear(1280, 2 * n_bits)``; ``"conv"``: :class:`bench.latent_nets.LatentDecoder` on the 3-channel image
    (stride-2 conv pairs, flatten, MLP). Inputs are resized (bilinear) to ``input_size`` (0: as given; the conv
    decoder needs a size) and mapped to [-1, 1].
    """

    def __init__(self, n_bits: int, arch: str = "efficientnet_b1", input_size: int = 512,
                 conv_channels: Sequence[int] = (32, 64), conv_hidden: int = 256, conv_mlp_layers: int = 1):
        super().__init__()
        self.n_bits = int(n_bits)
        self.arch = arch
        self.input_size = int(input_size)
        if arch == "efficientnet_b1":
            from torchvision.models import efficientnet_b1

            self.net = efficientnet_b1(weights=None)
            self.net.classifier[1] = nn.Linear(self.net.classifier[1].in_features, 2 * self.n_bits)
        elif arch == "conv":
            if self.input_size < 1:
                raise UserError("aqualora: the conv decoder needs an input size (decoder_input_size > 0)")
            self.net = LatentDecoder(2 * self.n_bits, 3, (self.input_size, self.input_size),
                                     [int(c) for c in conv_channels], int(conv_hidden), int(conv_mlp_layers), 0.0)
        else:
            raise UserError(f"aqualora: decoder = {arch!r}; allowed: 'efficientnet_b1', 'conv'")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        s = self.input_size
        if s and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1).view(-1, self.n_bits, 2)

    def bit_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, n_bits]``: class-1 minus class-0 logit (bit = logit > 0)."""
        out = self(images)
        return out[..., 1] - out[..., 0]


def message_loss(two_class_logits: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
    """The official message loss: BCE of the ``[B, k, 2]`` logits against the one-hot message."""
    return F.binary_cross_entropy_with_logits(two_class_logits, F.one_hot(message.long(), 2).float())


def prvl_loss(clean: torch.Tensor, marked: torch.Tensor, window: int) -> torch.Tensor:
    """Peak regional variation: the channel-mean absolute difference averaged over ``window x window`` windows
    (zero padding ``window // 2``, stride 1), maximised over positions and the batch."""
    diff = (clean - marked).abs().mean(1, keepdim=True)
    w = max(1, min(int(window), diff.shape[-2], diff.shape[-1]))
    return F.avg_pool2d(diff, w, stride=1, padding=w // 2, count_include_pad=True).max()


def corner_shift(delta: torch.Tensor, scale_h: float, scale_w: float) -> torch.Tensor:
    """The official "cornerfy" augmentation: the residual's four quadrants pasted into the corners of a zero canvas
    ``scale_h x scale_w`` times larger, resized back (bilinear) to the residual's size."""
    b, c, h, w = delta.shape
    big_h, big_w = max(h, int(h * scale_h)), max(w, int(w * scale_w))
    h1, w1 = h // 2, w // 2
    h2, w2 = h - h1, w - w1
    canvas = delta.new_zeros(b, c, big_h, big_w)
    canvas[:, :, :h1, :w1] = delta[:, :, :h1, :w1]
    canvas[:, :, :h1, big_w - w2:] = delta[:, :, :h1, w1:]
    canvas[:, :, big_h - h2:, :w1] = delta[:, :, h1:, :w1]
    canvas[:, :, big_h - h2:, big_w - w2:] = delta[:, :, h1:, w1:]
    return F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------
# Distortions (all randomness from the generator passed in)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistortionSpec:
    """Strength ranges of the training distortions (fractions of the image side; [0, 1] pixel scale).

    ``PRETRAIN`` is the official pre-training noiser: crop sides U(0.5, 1) and an intermediate resize to U(0.5, 1)
    of the side before resizing back; Gaussian blur with a 3 x 9 kernel and sigma U(0, 10) per image; Gaussian noise
    with a per-batch std U(0, 0.1) (0.2 on the official [-1, 1] scale); colour jitter with brightness (additive)
    0.7-1.3, contrast 0.8-1.25, saturation 0.8-1.25, hue +-0.2 turn, in a random order. ``ROBUST`` is the milder set
    of the robustness fine-tuning: crop sides U(0.84, 1) resized straight back, blur kernel 3 x 5 with sigma 4,
    noise std 0.1 (clamped), jitter 0.8-1.2 / hue +-0.1.
    """

    crop: tuple[float, float] = (0.5, 1.0)
    resize: tuple[float, float] = (0.5, 1.0)
    blur_kernel: tuple[int, int] = (3, 9)
    blur_sigma: tuple[float, float] = (0.0, 10.0)
    noise_std: tuple[float, float] = (0.0, 0.1)
    clamp_noise: bool = False
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.8, 1.25)
    saturation: tuple[float, float] = (0.8, 1.25)
    hue: tuple[float, float] = (-0.2, 0.2)


PRETRAIN = DistortionSpec()
ROBUST = DistortionSpec(crop=(432 / 512, 1.0), resize=(1.0, 1.0), blur_kernel=(3, 5), blur_sigma=(4.0, 4.0),
                        noise_std=(0.1, 0.1), clamp_noise=True, brightness=(0.8, 1.2), contrast=(0.8, 1.2),
                        saturation=(0.8, 1.2), hue=(-0.1, 0.1))


def _uniform(lo: float, hi: float, gen: torch.Generator, n: int | None = None) -> Any:
    u = torch.rand((n if n is not None else 1,), generator=gen, dtype=torch.float64)
    v = lo + (hi - lo) * u
    return v.float() if n is not None else float(v)


def pick_distortion(probs: Sequence[float], gen: torch.Generator) -> str:
    """One of ``DISTORTIONS`` drawn with probabilities ``probs`` (normalised)."""
    p = torch.tensor([float(x) for x in probs], dtype=torch.float64)
    return DISTORTIONS[int(torch.multinomial(p / p.sum(), 1, generator=gen))]


def distort(images: torch.Tensor, kind: str, spec: DistortionSpec, gen: torch.Generator, jpeg_mode: str = "mask",
            jpeg_quality: int = 50) -> torch.Tensor:
    """Apply one distortion (a name of ``DISTORTIONS``) to a batch of images in [0, 1]; differentiable (JPEG through
    ``jpeg_mode``). The output has the input's size."""
    b, _, h, w = images.shape
    if kind == "identity":
        return images
    if kind == "jpeg":
        return jpeg(images, int(jpeg_quality), jpeg_mode)
    if kind == "crop":
        ch = max(1, min(h, int(round(h * _uniform(*spec.crop, gen)))))
        cw = max(1, min(w, int(round(w * _uniform(*spec.crop, gen)))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        x = images[..., top:top + ch, left:left + cw]
        rh = max(1, int(round(h * _uniform(*spec.resize, gen))))
        rw = max(1, int(round(w * _uniform(*spec.resize, gen))))
        if (rh, rw) != (h, w):
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if kind == "blur":
        from kornia.filters import gaussian_blur2d

        kh, kw = (min(int(k), s - (1 - s % 2)) for k, s in zip(spec.blur_kernel, (h, w)))
        sigma = _uniform(*spec.blur_sigma, gen, n=b).clamp_min(1e-3).to(images.device, images.dtype)
        return gaussian_blur2d(images, (max(1, kh), max(1, kw)), torch.stack([sigma, sigma], 1))
    if kind == "noise":
        std = _uniform(*spec.noise_std, gen)
        out = images + std * torch.randn(images.shape, generator=gen).to(images.device, images.dtype)
        return out.clamp(0, 1) if spec.clamp_noise else out
    if kind == "jitter":
        from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation

        dev = images.device
        factors = [_uniform(*r, gen, n=b).to(dev, images.dtype)
                   for r in (spec.brightness, spec.contrast, spec.saturation, spec.hue)]
        steps = (lambda x, f: adjust_brightness(x, f - 1), adjust_contrast, adjust_saturation,
                 lambda x, f: adjust_hue(x, f * 2 * math.pi))
        x = images.clamp(0, 1)
        for i in torch.randperm(4, generator=gen).tolist():
            x = steps[i](x, factors[i]).clamp(0, 1)
        return x
    raise ValueError(f"unknown distortion {kind!r}; allowed: {', '.join(DISTORTIONS)}")


# ---------------------------------------------------------------------------------------------------------------
# Small pieces, exposed for tests
# ---------------------------------------------------------------------------------------------------------------
def step_lr(step: int, every: int, gamma: float) -> float:
    """The official stage-1 ``StepLR``: ``gamma ** (step // every)``."""
    return float(gamma) ** (step // every) if every > 0 else 1.0


def cosine_lr_end(step: int, steps: int, lr_end: float) -> float:
    """The official PPFT schedule without warm-up: ``max(lr_end, 0.5 (1 + cos(pi step / steps)))``."""
    return max(float(lr_end), 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(1, steps))))


def to_epsilon(pred: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A UNet output as the implied noise: as is (``epsilon``) or ``sqrt(abar) v + sqrt(1 - abar) x_t``
    (``v_prediction``)."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return abar.sqrt() * pred + (1 - abar).sqrt() * x_t
    raise UserError(f"aqualora: prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")


def _probs(values: Sequence[float], name: str) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) != len(DISTORTIONS) or any(v < 0 for v in vals) or sum(vals) <= 0:
        raise UserError(f"aqualora: {name} = {list(values)!r} must be {len(DISTORTIONS)} non-negative "
                        f"probabilities (not all zero) for {', '.join(DISTORTIONS)}")
    return vals


# ---------------------------------------------------------------------------------------------------------------
# The defence
# ---------------------------------------------------------------------------------------------------------------
@defenses.register("aqualora")
class AquaLoRA(Defense):
    """AquaLoRA (Feng et al., ICML 2024, arXiv 2405.11135): a 48-bit watermark in a LoRA (rank 320, every UNet
    transformer) whose product is scaled per message by a diagonal from a mapper net; the message is baked in and
    the LoRA merged into the UNet weights, so the deployed model is a plain pipeline.

    Stage 1 trains a message-only latent secret encoder and an image decoder (EfficientNet-B1 at 512 px) through the
    VAE decoder with distortions; stage 2 (prior-preserving fine-tuning) trains the LoRA and the mapper so that the
    LoRA model on noised ``z + E(m)`` predicts what the frozen model predicts on noised ``z``; an optional step
    fine-tunes the decoder on the LoRA model's own images. Verification is black box: the decoder on the image.
    Defaults are the paper's / official code's settings for Stable Diffusion. Substitutions: 1 - SSIM instead of
    LPIPS-VGG (no weights offline), a randomly initialised EfficientNet, self-generated training images. See
    ``docs/aqualora.md``.
    """

    version = "1"
    location = MarkLocation.MODEL_WEIGHTS
    threat = ThreatSetting.WEIGHTS
    verification = Verification.BLACK_BOX
    detection = DetectionKind.BITS

    # -- the mark ------------------------------------------------------------------------------------------
    bits: int = param(48, "message length in bits (paper 48)", low=1, high=1024)
    resolution: int = param(0, "training image side in pixels; 0 = the model's native (unet sample_size x "
            "vae_scale_factor)", low=0, high=4096)
    # -- training data -------------------------------------------------------------------------------------
    train_source: str = param("generated", "training images: generated by the base model for 'prompts', or 'dataset' "
            "through the harness (ctx.data)", choices=("generated", "dataset"))
    dataset: str = param("tiny:train", "the dataset when train_source = 'dataset' (captions condition PPFT)")
    prompts: str = param("micro:shapes", "training prompts (generated source): a world's prompt set ('tiny:train') or "
            "a text file, one per line")
    train_images: int = param(10000, "training images (official: 10k COCO 2017 images)", low=1, high=10_000_000)
    train_inference_steps: int = param(50, "sampling steps for generated training images", low=1, high=1000)
    train_guidance_scale: float = param(7.5, "guidance scale for generated/robustness images", low=0.0, high=50.0)
    gen_batch_size: int = param(16, "batch size when generating/encoding training images", low=1, high=4096)
    # -- stage 1: secret encoder / image decoder -----------------------------------------------------------
    secret_res: int = param(32, "secret encoder map side r (official 32, upsampled to the 64 x 64 latent); 0 = the "
            "latent side", low=0, high=256)
    decoder: str = param("efficientnet_b1", "image decoder: EfficientNet-B1 (paper; random init) or a small conv "
            "decoder", choices=("efficientnet_b1", "conv"))
    decoder_input_size: int = param(512, "decoder input side (images are resized to it; paper 512); 0 = the training "
            "resolution", low=0, high=4096)
    conv_channels: list[int] = param([32, 64], "conv decoder: widths of its stride-2/stride-1 pairs")
    conv_hidden: int = param(256, "conv decoder: MLP width", low=1, high=65536)
    conv_mlp_layers: int = param(1, "conv decoder: MLP hidden layers", low=1, high=16)
    stage1_steps: int = param(80000, "stage-1 steps (official: 40 epochs of 10k images at batch 5)", low=0,
            high=100_000_000)
    stage1_batch_size: int = param(5, "stage-1 batch (official 5)", low=1, high=4096)
    stage1_lr: float = param(1e-3, "stage-1 AdamW learning rate (official 1e-3)", low=0.0, high=1.0)
    stage1_weight_decay: float = param(1e-4, "stage-1 AdamW weight decay", low=0.0, high=10.0)
    stage1_lr_step: int = param(4000, "stage-1 learning rate x gamma every this many steps (official: every 2 epochs)",
            low=0, high=100_000_000)
    stage1_lr_gamma: float = param(0.8, "stage-1 step decay factor", low=0.0, high=1.0)
    warmup: bool = param(True, "warm-up on a zero image's latent with a scaled residual and the message loss alone, "
            "until the message loss drops below warmup_loss (official)")
    warmup_scale: float = param(0.03, "residual scale during the warm-up", low=0.0, high=1e3)
    warmup_loss: float = param(0.1, "the warm-up ends when the mean message loss of the last 10 steps is below this",
            low=0.0, high=10.0)
    warmup_max_steps: int = param(0, "end the warm-up after this many steps at the latest; 0 = no limit (official)",
            low=0, high=100_000_000)
    corner_prob: float = param(0.25, "probability per batch of the 'cornerfy' residual augmentation", low=0.0, high=1.0)
    perceptual: str = param("ssim", "image term: 1-SSIM (offline default), MSE (does not saturate on large residuals), "
            "LPIPS (AlexNet; the official code uses VGG) or none", choices=("ssim", "mse", "lpips", "none"))
    perceptual_start: int = param(14000, "step from which perceptual_weight_early x P is added (official: epoch 7)",
            low=0, high=100_000_000)
    full_loss_start: int = param(22000, "step from which the loss is msg + perceptual_weight x P + prvl_weight x PRVL "
            "(official: epoch 11)", low=0, high=100_000_000)
    perceptual_weight_early: float = param(1.0, "weight of P between perceptual_start and full_loss_start", low=0.0,
            high=1e6)
    perceptual_weight: float = param(5.0, "weight of P from full_loss_start", low=0.0, high=1e6)
    prvl_weight: float = param(1.5, "weight of the peak regional variation loss", low=0.0, high=1e6)
    prvl_window: int = param(32, "PRVL window side in pixels (official 32 at 512 px)", low=1, high=4096)
    distortion_start: int = param(26000, "step from which 'distortions' replaces 'distortions_early' (official: epoch "
            "13)", low=0, high=100_000_000)
    distortions_early: list[float] = param([0.6, 0.0, 0.4, 0.0, 0.0, 0.0], "probabilities of identity, jpeg, crop, "
            "blur, noise, jitter before distortion_start")
    distortions: list[float] = param([0.4, 0.1, 0.2, 0.05, 0.1, 0.15], "probabilities of identity, jpeg, crop, blur, "
            "noise, jitter from distortion_start")
    jpeg_mode: str = param("mask", "differentiable JPEG: HiDDeN's JPEG-Mask (official), kornia's codec, or the real "
            "codec straight-through", choices=JPEG_MODES)
    jpeg_quality: int = param(50, "JPEG quality (kornia and ste modes)", low=1, high=100)
    # -- stage 2: prior-preserving fine-tuning -------------------------------------------------------------
    lora_rank: int = param(320, "LoRA rank (paper 320)", low=1, high=100_000)
    mapper_std: float = param(1.0, "std of each row of the mapper's embedding at initialisation", low=0.0, high=1e3)
    stage2_steps: int = param(25000, "PPFT steps (official: 30 epochs at batch 12; 25k = a 10k-image set)", low=0,
            high=100_000_000)
    stage2_batch_size: int = param(12, "PPFT batch (official 12)", low=1, high=4096)
    stage2_lr: float = param(1e-4, "PPFT AdamW learning rate (LoRA and mapper)", low=0.0, high=1.0)
    stage2_weight_decay: float = param(1e-2, "PPFT AdamW weight decay", low=0.0, high=10.0)
    stage2_lr_end: float = param(0.01, "PPFT cosine schedule floor (fraction of the learning rate)", low=0.0, high=1.0)
    stage2_grad_clip: float = param(1.0, "gradient-norm clip of the LoRA parameters", low=0.0, high=1e6)
    adam_eps: float = param(1e-8, "Adam epsilon (PPFT and robustness fine-tuning)", low=0.0, high=1.0)
    lora_scale: float = param(1.03, "strength of the baked LoRA (official create_wm_lora: 1.03; also used when the "
            "robustness step generates)", low=0.0, high=100.0)
    # -- optional: decoder robustness fine-tuning ----------------------------------------------------------
    robust_steps: int = param(6250, "decoder fine-tuning steps on the LoRA model's images (official: 10 epochs of 10k "
            "captions at batch 16); 0 = skip", low=0, high=100_000_000)
    robust_batch_size: int = param(16, "images generated per robustness step", low=1, high=4096)
    robust_lr: float = param(5e-6, "robustness AdamW learning rate", low=0.0, high=1.0)
    robust_weight_decay: float = param(1e-2, "robustness AdamW weight decay", low=0.0, high=10.0)
    robust_lr_end: float = param(0.1, "robustness cosine schedule floor", low=0.0, high=1.0)
    robust_inference_steps: int = param(20, "sampling steps of the robustness images", low=1, high=1000)
    robust_size_factors: list[float] = param([1.0, 1.125, 1.25, 1.375, 1.5], "image sides of the robustness images, as "
            "multiples of the resolution (official 512-768 px)")
    robust_distortions: list[float] = param([0.6, 0.0, 0.15, 0.05, 0.1, 0.1], "probabilities of identity, jpeg, crop, "
            "blur, noise, jitter in the robustness step (milder strengths)")

    smoke_params = dict(
        train_images=4, train_inference_steps=2, gen_batch_size=4, secret_res=0, decoder="conv",
        decoder_input_size=0, conv_channels=[8, 8], conv_hidden=16, stage1_steps=3, stage1_batch_size=2,
        perceptual_start=1, full_loss_start=2, distortion_start=2, prvl_window=8, lora_rank=4, stage2_steps=2,
        stage2_batch_size=2, robust_steps=1, robust_batch_size=2, robust_inference_steps=2,
        robust_size_factors=[1.0],
    )

    def __init__(self, **given: Any):
        super().__init__(**given)
        for name in ("distortions_early", "distortions", "robust_distortions"):
            _probs(getattr(self, name), name)
        if not self.conv_channels or any(int(c) < 1 for c in self.conv_channels):
            raise UserError(f"aqualora: conv_channels = {self.conv_channels!r} must be a non-empty list of positive "
                            f"integers")
        if not self.robust_size_factors or any(float(f) <= 0 for f in self.robust_size_factors):
            raise UserError(f"aqualora: robust_size_factors = {self.robust_size_factors!r} must be a non-empty list "
                            f"of positive numbers")
        self._detectors: dict[str, ImageDecoder] = {}

    # -- helpers ----------------------------------------------------------------------------------------------
    def _resolution(self, pipe) -> int:
        if self.resolution:
            return self.resolution
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        if resolution % factor:
            raise UserError(f"aqualora: resolution {resolution} is not a multiple of the VAE's scale factor {factor}")
        return int(pipe.unet.config.in_channels), resolution // factor, resolution // factor

    def make_decoder(self, n_bits: int, input_size: int) -> ImageDecoder:
        return ImageDecoder(n_bits, self.decoder, input_size, [int(c) for c in self.conv_channels],
                            self.conv_hidden, self.conv_mlp_layers)

    def _decoder_size(self, resolution: int) -> int:
        return self.decoder_input_size or (int(resolution) if self.decoder == "conv" else 0)

    def training_pool(self, pipe, ctx, gen: torch.Generator, resolution: int
                      ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``train_images`` images (generated by the base model, or from ``dataset``) at ``resolution``, quantised
        to 8 bits, VAE-encoded once: ``(captions, posterior mean, posterior std)`` in the scaled latent space."""
        n = self.train_images
        chunk = self.gen_batch_size
        if self.train_source == "dataset":
            if ctx.data is None:
                raise UserError("aqualora: train_source = 'dataset' needs the harness's data resources (ctx.data)")
            images, captions = ctx.data.dataset(self.dataset, n)
            batches: Iterable[tuple[torch.Tensor, list[str]]] = (
                (images[s:s + chunk], list(captions[s:s + chunk])) for s in range(0, images.shape[0], chunk))
        else:
            batches = self._generated(pipe, ctx, gen, resolution, n, chunk)
        means, stds, caps = [], [], []
        for imgs, cap in batches:
            imgs = imgs.float()
            if tuple(imgs.shape[-2:]) != (resolution, resolution):
                imgs = F.interpolate(imgs, size=(resolution, resolution), mode="bicubic", align_corners=False,
                                     antialias=True)
            with torch.no_grad():
                m, s = to_latent(pipe.vae, quantize8(imgs).to(pipe.vae.device, pipe.vae.dtype))
            means.append(m.float().cpu())
            stds.append(s.float().cpu())
            caps.extend(cap)
        return caps, torch.cat(means), torch.cat(stds)

    def _generated(self, pipe, ctx, gen, resolution, n, chunk):
        prompts = read_prompts(self.prompts, "aqualora: prompts")
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=gen).tolist()
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        starts = range(0, n, chunk)
        for s in ctx.progress(starts, total=len(starts), description="aqualora: training images"):
            request = GenerationRequest(prompts=tuple(chosen[s:s + chunk]), seeds=tuple(seeds[s:s + chunk]),
                                        height=resolution, width=resolution,
                                        num_inference_steps=self.train_inference_steps,
                                        guidance_scale=self.train_guidance_scale, batch_size=chunk)
            yield ctx.generate(pipe, request), chosen[s:s + chunk]

    @staticmethod
    def _sample(mean: torch.Tensor, std: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A posterior sample of the training latents ``idx`` (the official code samples every step)."""
        return mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)

    # -- stage 1 ----------------------------------------------------------------------------------------------
    def train_stage1(self, vae, mean: torch.Tensor, std: torch.Tensor, n_bits: int, ctx, gen: torch.Generator,
                     decoder_size: int) -> tuple[AquaSecretEncoder, ImageDecoder, dict[str, float]]:
        """Train the secret encoder and the image decoder through the frozen VAE decoder on the training latents
        (``mean``/``std``: scaled posterior, CPU). Returns ``(encoder, decoder, stats)`` in eval mode."""
        c, h, w = mean.shape[1:]
        device = next(vae.parameters()).device
        r = self.secret_res or min(h, w)
        encoder = seeded(gen, lambda: AquaSecretEncoder(n_bits, c, (h, w), r)).to(device).train()
        decoder = seeded(gen, lambda: self.make_decoder(n_bits, decoder_size)).to(device).train()
        opt = torch.optim.AdamW(list(encoder.parameters()) + list(decoder.parameters()), lr=self.stage1_lr,
                                weight_decay=self.stage1_weight_decay)
        every, gamma = self.stage1_lr_step, self.stage1_lr_gamma
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: step_lr(s, every, gamma))
        perceptual = PerceptualLoss(self.perceptual, device, owner="aqualora",
                                    offline="perceptual = 'ssim' (1 - SSIM, the default)")
        zero_mean = zero_std = None
        if self.warmup:  # the official warm-up encodes an all-zero image in [-1, 1]: mid-grey in [0, 1]
            grey = torch.full((1, 3, *_image_size(vae, (h, w))), 0.5, device=device, dtype=vae.dtype)
            with torch.no_grad():
                zero_mean, zero_std = (t.float().cpu() for t in to_latent(vae, grey))
        with global_rng_from(gen, device):  # dropout / stochastic depth draw from the global RNG
            stats = self._stage1_loop(encoder, decoder, vae, opt, sched, perceptual, mean, std, zero_mean, zero_std,
                                      n_bits, ctx, gen)
        encoder.eval().requires_grad_(False)
        decoder.eval().requires_grad_(False)
        return encoder, decoder, stats

    def _stage1_loop(self, encoder, decoder, vae, opt, sched, perceptual, mean, std, zero_mean, zero_std, n_bits,
                     ctx, gen) -> dict[str, float]:
        device = next(decoder.parameters()).device
        sf = float(vae.config.scaling_factor)
        steps, bsz = self.stage1_steps, self.stage1_batch_size
        early, full = _probs(self.distortions_early, "distortions_early"), _probs(self.distortions, "distortions")
        warm = self.warmup
        warmup_end = 0 if not warm else -1
        recent: list[float] = []
        accs: list[float] = []
        for step in ctx.progress(range(steps), total=steps, description="aqualora: stage 1"):
            if warm:
                z = self._sample(zero_mean, zero_std, torch.zeros(bsz, dtype=torch.long), gen)
            else:
                z = self._sample(mean, std, torch.randint(0, mean.shape[0], (bsz,), generator=gen), gen)
            z = z.to(device)
            m = torch.randint(0, 2, (bsz, n_bits), generator=gen).to(device)
            delta = encoder(m.float()) * sf  # the encoder's residual is in unscaled latent units
            if _uniform(0.0, 1.0, gen) < self.corner_prob:
                delta = corner_shift(delta, _uniform(1.0, 2.0, gen), _uniform(1.0, 2.0, gen))
            z_w = z + delta * (self.warmup_scale if warm else 1.0)
            marked = from_latent(vae, z_w.to(vae.dtype)).float()
            probs = early if step < self.distortion_start else full
            out = decoder(distort(marked, pick_distortion(probs, gen), PRETRAIN, gen, self.jpeg_mode,
                                  self.jpeg_quality))
            msg = message_loss(out, m)
            loss = msg
            if not warm and step >= self.perceptual_start:
                full_loss = step >= self.full_loss_start
                w_p = self.perceptual_weight if full_loss else self.perceptual_weight_early
                w_r = self.prvl_weight if full_loss else 0.0
                if (w_p > 0 and perceptual.kind != "none") or w_r > 0:
                    with torch.no_grad():
                        clean = from_latent(vae, z.to(vae.dtype)).float()
                    if w_p > 0 and perceptual.kind != "none":
                        loss = loss + w_p * perceptual(clean, marked)
                    if w_r > 0:
                        loss = loss + w_r * prvl_loss(clean, marked, self.prvl_window)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            recent = (recent + [float(msg.detach())])[-10:]
            accs = (accs + [float(((out[..., 1] - out[..., 0]).detach() > 0).eq(m > 0).float().mean())])[-10:]
            if warm and ((len(recent) == 10 and sum(recent) / 10 < self.warmup_loss)
                         or (self.warmup_max_steps and step + 1 >= self.warmup_max_steps)):
                warm, warmup_end = False, step + 1
        mean_of = lambda v: float(sum(v) / len(v)) if v else float("nan")  # noqa: E731
        return {"stage1_message_loss": mean_of(recent), "stage1_train_bit_accuracy": mean_of(accs),
                "stage1_warmup_end_step": float(warmup_end)}

    # -- stage 2 ----------------------------------------------------------------------------------------------
    def ppft_loss(self, unet, lora: MessageLoRAModel, z0: torch.Tensor, delta: torch.Tensor, diag: torch.Tensor,
                  noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, alphas_cumprod: torch.Tensor,
                  prediction_type: str = "epsilon") -> torch.Tensor:
        """``MSE(eps_LoRA(q(z0 + delta, t, noise); s), eps_0(q(z0, t, noise)))`` (implied noises)."""
        abar = alphas_cumprod[t].view(-1, 1, 1, 1).to(z0.dtype)
        x_clean = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        x_marked = abar.sqrt() * (z0 + delta) + (1 - abar).sqrt() * noise
        with torch.no_grad(), lora.state.use(None):
            ref = to_epsilon(unet(x_clean, t, cond, return_dict=False)[0], x_clean, abar, prediction_type)
        with lora.state.use(diag):
            pred = to_epsilon(unet(x_marked, t, cond, return_dict=False)[0], x_marked, abar, prediction_type)
        return F.mse_loss(pred.float(), ref.float())

    def train_stage2(self, pipe, lora: MessageLoRAModel, mapper: Mapper, encoder: AquaSecretEncoder,
                     emb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n_bits: int, ctx,
                     gen: torch.Generator, caption_index: torch.Tensor | None = None) -> dict[str, float]:
        """Train the LoRA and the mapper in place (the UNet's own weights stay frozen). Training latent ``i`` is
        conditioned on ``emb[caption_index[i]]`` (``caption_index`` None: ``emb[i]``)."""
        if caption_index is None:
            caption_index = torch.arange(mean.shape[0])
        unet = pipe.unet
        device = unet.device
        lora_params = lora.parameters()
        for p in lora_params + list(mapper.parameters()):
            p.requires_grad_(True)
        steps = self.stage2_steps
        opt = torch.optim.AdamW([{"params": lora_params}, {"params": list(mapper.parameters())}],
                                lr=self.stage2_lr, weight_decay=self.stage2_weight_decay,
                                eps=self.adam_eps)
        lr_end = self.stage2_lr_end
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr_end(s, steps, lr_end))
        alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        prediction_type = str(getattr(pipe.scheduler.config, "prediction_type", "epsilon"))
        sf = float(pipe.vae.config.scaling_factor)
        bsz, n_t = self.stage2_batch_size, int(alphas_cumprod.shape[0])
        losses: list[float] = []
        unet.train()
        mapper.train()
        with global_rng_from(gen, device):
            for _ in ctx.progress(range(steps), total=steps, description="aqualora: PPFT"):
                idx = torch.randint(0, mean.shape[0], (bsz,), generator=gen)
                z0 = self._sample(mean, std, idx, gen).to(device)
                m = torch.randint(0, 2, (bsz, n_bits), generator=gen).float().to(device)
                noise = torch.randn(z0.shape, generator=gen).to(device)
                t = torch.randint(0, n_t, (bsz,), generator=gen).to(device)
                with torch.no_grad():
                    delta = encoder(m) * sf
                loss = self.ppft_loss(unet, lora, z0, delta, mapper(m), noise, t, emb[caption_index[idx]].to(device),
                                      alphas_cumprod, prediction_type)
                optimizer_step(opt, loss, lora_params, self.stage2_grad_clip, sched)
                losses = (losses + [float(loss.detach())])[-10:]
        unet.eval()
        mapper.eval().requires_grad_(False)
        for p in lora_params:
            p.requires_grad_(False)
        return {"stage2_loss": float(sum(losses) / len(losses)) if losses else float("nan")}

    # -- optional: decoder robustness fine-tuning ------------------------------------------------------------
    def robust_finetune(self, pipe, lora: MessageLoRAModel, mapper: Mapper, decoder: ImageDecoder,
                        captions: Sequence[str], resolution: int, n_bits: int, ctx,
                        gen: torch.Generator) -> dict[str, float]:
        """Fine-tune the decoder on images the LoRA model generates for random messages (sides drawn from
        ``robust_size_factors x resolution``), after the milder ``ROBUST`` distortions."""
        device = next(decoder.parameters()).device
        steps, bsz = self.robust_steps, self.robust_batch_size
        decoder.train().requires_grad_(True)
        params = list(decoder.parameters())
        opt = torch.optim.AdamW(params, lr=self.robust_lr, weight_decay=self.robust_weight_decay,
                                eps=self.adam_eps)
        lr_end = self.robust_lr_end
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr_end(s, steps, lr_end))
        probs = _probs(self.robust_distortions, "robust_distortions")
        quantum = int(getattr(pipe, "vae_scale_factor", 8)) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        sizes = sorted({max(quantum, int(round(resolution * float(f) / quantum)) * quantum)
                        for f in self.robust_size_factors})
        accs: list[float] = []
        with global_rng_from(gen, device):
            for _ in ctx.progress(range(steps), total=steps, description="aqualora: decoder robustness"):
                m = torch.randint(0, 2, (bsz, n_bits), generator=gen)
                idx = torch.randint(0, len(captions), (bsz,), generator=gen).tolist()
                seeds = torch.randint(0, 2**31 - 1, (bsz,), generator=gen).tolist()
                hh = sizes[int(torch.randint(0, len(sizes), (1,), generator=gen))]
                ww = sizes[int(torch.randint(0, len(sizes), (1,), generator=gen))]
                request = GenerationRequest(prompts=tuple(captions[i] for i in idx), seeds=tuple(seeds), height=hh,
                                            width=ww, num_inference_steps=self.robust_inference_steps,
                                            guidance_scale=self.train_guidance_scale, batch_size=bsz)
                with torch.no_grad():
                    diag = (mapper(m.float().to(device)) * self.lora_scale).detach()
                with lora.state.use(diag):
                    images = quantize8(ctx.generate(pipe, request)).to(device)
                images = distort(images, pick_distortion(probs, gen), ROBUST, gen, self.jpeg_mode,
                                 self.jpeg_quality)
                out = decoder(images)
                loss = message_loss(out, m.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                accs = (accs + [float(((out[..., 1] - out[..., 0]).detach() > 0).eq(m.to(device) > 0)
                                      .float().mean())])[-10:]
        decoder.eval().requires_grad_(False)
        return {"robust_train_bit_accuracy": float(sum(accs) / len(accs)) if accs else float("nan")}

    # -- Defense API --------------------------------------------------------------------------------------------
    def embed(self, pipe, ctx) -> Embedding:
        if pipe.unet.dtype != torch.float32 or pipe.vae.dtype != torch.float32:
            raise UserError("aqualora trains in float32: set model.dtype = \"float32\"")
        t0 = time.perf_counter()
        n_bits = self.bits
        message = torch.randint(0, 2, (n_bits,), generator=ctx.generator).bool()
        g_data, g_s1, g_s2, g_rob = (sub_generator(ctx.generator) for _ in range(4))
        resolution = self._resolution(pipe)
        latent_shape = self.latent_shape(pipe, resolution)
        device = pipe.unet.device
        pipe.unet.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)

        captions, mean, std = self.training_pool(pipe, ctx, g_data, resolution)
        if tuple(mean.shape[1:]) != latent_shape:
            raise UserError(f"aqualora: the VAE gives latents {tuple(mean.shape[1:])}, the UNet expects "
                            f"{latent_shape}")
        t1 = time.perf_counter()

        decoder_size = self._decoder_size(resolution)
        encoder, decoder, stats = self.train_stage1(pipe.vae, mean, std, n_bits, ctx, g_s1, decoder_size)
        stats.update(self._stage1_probe(pipe.vae, encoder, decoder, mean, message))
        t2 = time.perf_counter()

        unique = list(dict.fromkeys(captions))  # captions repeat: each is encoded once, indexed per sample
        position = {c: i for i, c in enumerate(unique)}
        caption_index = torch.tensor([position[c] for c in captions])
        with torch.no_grad():
            emb = prompt_embeds(pipe, unique, device)
        lora = seeded(g_s2, lambda: MessageLoRAModel(pipe.unet, self.lora_rank))
        mapper = seeded(g_s2, lambda: Mapper(n_bits, self.lora_rank, self.mapper_std)).to(device)
        n_trainable = sum(p.numel() for p in lora.parameters()) + sum(p.numel() for p in mapper.parameters())
        n_modules = len(lora.layers)
        try:
            stats.update(self.train_stage2(pipe, lora, mapper, encoder, emb, mean, std, n_bits, ctx, g_s2,
                                           caption_index))
            t3 = time.perf_counter()
            if self.robust_steps > 0:
                stats.update(self.robust_finetune(pipe, lora, mapper, decoder, captions, resolution, n_bits, ctx,
                                                  g_rob))
            t4 = time.perf_counter()
            with torch.no_grad():
                diag = mapper(message.float()[None].to(device))[0] * self.lora_scale
            lora.merge(diag)  # the deployed model: a plain UNet with the baked LoRA folded into its weights
        except BaseException:
            lora.remove()
            raise
        pipe.unet.eval().requires_grad_(False)

        secret = self.make_secret(message, decoder, diag, resolution, latent_shape)
        secret.meta.update({k: float(v) for k, v in stats.items()})
        secret.meta["lora_modules"] = n_modules
        ctx.record_cost(stage1_steps=self.stage1_steps, stage2_steps=self.stage2_steps,
                        robust_steps=self.robust_steps, trainable_params=int(n_trainable),
                        lora_modules=n_modules, train_images=len(captions), data_seconds=t1 - t0,
                        stage1_seconds=t2 - t1, stage2_seconds=t3 - t2, robust_seconds=t4 - t3,
                        stage1_bit_accuracy=stats["stage1_bit_accuracy_mstar"])
        return Embedding(secret, pipeline=pipe)

    @torch.no_grad()
    def _stage1_probe(self, vae, encoder, decoder, mean: torch.Tensor, message: torch.Tensor) -> dict[str, float]:
        """Stage-1 diagnostics on up to 16 training latents: bit accuracy of ``Dec(z + E(m*))`` (8-bit quantised)
        and of ``Dec(z)`` against ``m*``; how visible the residual is (PSNR of the first to the second image, in dB)
        and how large (RMS of ``E(m*)`` over the RMS of ``z``)."""
        device = next(decoder.parameters()).device
        z = mean[:16].to(device)
        delta = encoder(message.float()[None].to(device)) * float(vae.config.scaling_factor)
        marked = quantize8(from_latent(vae, (z + delta).to(vae.dtype)).float())
        clean = quantize8(from_latent(vae, z.to(vae.dtype)).float())
        out = {}
        for name, images in (("stage1_bit_accuracy_mstar", marked), ("stage1_bit_accuracy_clean", clean)):
            bits = decoder.bit_logits(images) > 0
            out[name] = float((bits == message.to(device)[None]).float().mean())
        mse = (marked - clean).pow(2).flatten(1).mean(1)
        out["stage1_residual_psnr"] = float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())
        out["stage1_residual_rms"] = float(delta.pow(2).mean().sqrt() / z.pow(2).mean().sqrt().clamp_min(1e-12))
        return out

    def make_secret(self, message: torch.Tensor, decoder: ImageDecoder, diag: torch.Tensor, resolution: int,
                    latent_shape: Sequence[int]) -> Secret:
        """What verification needs: the message and the decoder (``decoder.*``) with its architecture in ``meta``;
        ``lora_diag`` (the baked diagonal, times ``lora_scale``) is kept for analysis."""
        tensors = {"message": message.bool().cpu(), **state_tensors("decoder", decoder),
                   "lora_diag": diag.detach().float().cpu().contiguous()}
        meta = {"method": "aqualora", "n_bits": int(message.numel()), "decoder": decoder.arch,
                "decoder_input_size": int(decoder.input_size), "conv_channels": [int(c) for c in self.conv_channels],
                "conv_hidden": self.conv_hidden, "conv_mlp_layers": self.conv_mlp_layers,
                "resolution": int(resolution), "latent_shape": [int(x) for x in latent_shape],
                "lora_rank": self.lora_rank, "lora_scale": self.lora_scale}
        return Secret(tensors, meta)

    def detector(self, secret: Secret) -> ImageDecoder:
        """The image decoder rebuilt from the secret alone (cached per secret)."""
        key = digest({k: v for k, v in secret.tensors.items() if k.startswith("decoder.")})
        if key not in self._detectors:
            meta = secret.meta
            with torch.random.fork_rng(devices=[]):  # the throw-away initialisation leaves the global RNG alone
                net = ImageDecoder(int(meta["n_bits"]), meta["decoder"], int(meta["decoder_input_size"]),
                                   meta["conv_channels"], int(meta["conv_hidden"]), int(meta["conv_mlp_layers"]))
            self._detectors = {key: load_prefixed(net, secret.tensors, "decoder")}
        return self._detectors[key]

    def logits(self, secret: Secret, images: torch.Tensor, device: Any = "cpu") -> torch.Tensor:
        """Per-bit logits ``[N, k]`` (bit = logit > 0), on the CPU."""
        net = self.detector(secret).to(device)
        with torch.no_grad():
            return torch.cat([net.bit_logits(images[s:s + 16].float().to(device)).cpu()
                              for s in range(0, images.shape[0], 16)])

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        device = getattr(ctx, "device", "cpu") or "cpu"
        return Detection(bits=(self.logits(secret, images, device) > 0).cpu())


def _image_size(vae, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The image size whose latent has ``latent_size`` (``2 ** (len(block_out_channels) - 1)`` per side)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return latent_size[0] * factor, latent_size[1] * factor
