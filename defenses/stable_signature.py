"""Stable Signature: a fixed key rooted in the latent decoder (VAE decoder) of a latent diffusion model.

Fernandez, Couairon, Jegou, Douze and Furon, "The Stable Signature: Rooting Watermarks in Latent Diffusion Models",
ICCV 2023, arXiv 2303.15435 (official code: facebookresearch/stable_signature, consulted for facts only; this file
is written afresh).

Three steps, all run by :meth:`StableSignature.embed` on the pipeline under test:

1. **Extractor pre-training** (the paper's Sec. 3.1, the "revisited HiDDeN" of the official ``hidden/`` folder): a
   HiDDeN encoder/decoder pair (:mod:`defenses.hidden`, imported) with 48 bits, GELU blocks, a 4 x 64 encoder whose
   residual is added as ``I + strength * tanh(E(I, M))``, an 8 x 64 decoder, BCE message loss, no image loss, no
   adversary, trained through one augmentation per mini-batch drawn uniformly from identity, horizontal flip,
   crop (area 0.3 / 0.7), resize (area 0.3 / 0.7) and JPEG (quality 50 / 80; straight-through real codec, i.e. the
   forward-ASL trick). Only the decoder is kept: it is the extractor ``W``.
2. **Whitening** (PCA): the extractor's outputs ``y`` on clean training images are centred and rotated/scaled so
   that their covariance is the identity, ``y_w = diag(e)^-1/2 V^T (y - mu)`` with ``C = V diag(e) V^T``, folded
   into a final linear layer. Bits are read as ``y_w > 0``.
3. **Decoder fine-tuning**: a copy ``D_w`` of the VAE decoder (with its ``post_quant_conv``) is trained so that every
   image it decodes carries the key ``m``::

       L = lambda_w * BCE(T * W(D_w(z)), m) + lambda_i * perceptual(D_w(z), D_0(z)),   z = E(x) (posterior mode)

   with ``T = 10`` (the official loss temperature), ``lambda_w = 1``, ``lambda_i = 0.2``, AdamW lr 5e-4, 100 steps
   of batch 4, 20 warm-up steps then a half-cosine down to 1e-6 (the official schedule). The encoder, UNet and text
   encoder are untouched: only the VAE decoder changes.

Detection (black box): the whitened extractor on the image, ``bits = W(x) > 0``; the harness turns bit accuracies
into p-values with Binomial(48, 0.5). The secret holds the key, the extractor's weights and the whitening.

Substitutions (see ``docs/stable_signature.md``):

* **Perceptual loss.** The paper's Watson-VGG (Czolbe et al., NeurIPS 2020) needs trained weights that are not
  available offline. The default ``perceptual = "watson_dct"`` is a Watson-DCT distance implemented here (Watson's
  1993 DCT perceptual model, the member of the same family that needs no learned weights): YCbCr, 8x8 DCT, Watson's
  frequency thresholds with luminance masking (exponent 0.649) and contrast masking (exponent 0.7), Minkowski
  pooling (beta 4) per image and channel, summed over channels, averaged over the batch. ``"ssim"`` (1 - SSIM),
  ``"mse"`` (the official code's other option), ``"lpips"`` (needs the ``lpips`` package and weights) and ``"none"``
  are selectable.
* **Whitening scale.** The official code builds the covariance without dividing by N and multiplies the whitened
  output by ``sqrt(k)``, so its whitened outputs have covariance ``(k / N) I``; here the covariance is exactly the
  identity (what the paper describes). The loss temperature is kept at the official 10.
* **Training data.** The paper trains on COCO. Offline, images come from ``dataset`` (default ``tiny:train``) or from
  the pipeline itself (``train_source = "generated"``). The extractor's official data augmentation of the covers
  (random resized crop, colour jitter) is left out.
* **Optimiser of the extractor.** The official run uses LAMB (lr 2e-2 scaled by batch / 512, i.e. 5e-3 at batch
  128) with a cosine schedule and 5 warm-up epochs; LAMB comes from timm (installed with open-clip-torch);
  ``extractor_optimizer = "adam"`` avoids it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from markbench import (Defense, Detection, DetectionKind, Embedding, MarkLocation, param, Secret, ThreatSetting,
                       UserError, Verification)
from markbench.registries import defenses
from markbench.training import PerceptualLoss
from markbench.noise import JPEG_MODES, NOISE_LAYERS, NoiseLayers, block_dct, quantize8
from markbench.packing import digest, load_prefixed, state_tensors
from markbench.rng import forked_global_rng, sub_generator
from markbench.training import training_images
from markbench.defenses.hidden import HiddenConfig, HiddenDecoder, config_from_arch, lr_factor, train_hidden


# ---------------------------------------------------------------------------------------------------------------
# The extractor: HiDDeN decoder + whitening
# ---------------------------------------------------------------------------------------------------------------
class Extractor(nn.Module):
    """The whitened HiDDeN decoder: ``whiten(decoder(x))``; a bit is ``> 0``."""

    def __init__(self, decoder: HiddenDecoder):
        super().__init__()
        self.decoder = decoder
        self.whiten = nn.Linear(decoder.bits, decoder.bits)
        nn.init.eye_(self.whiten.weight)
        nn.init.zeros_(self.whiten.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.whiten(self.decoder(images))


def whitening(outputs: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening of ``outputs`` ``[N, k]``: ``(weight, bias)`` with ``weight @ (y - mu) = weight @ y + bias``
    of identity covariance. ``C = V diag(e) V^T`` (population covariance), ``weight = diag(e)^-1/2 V^T``; eigenvalues
    are floored at ``eps * max(e)`` so a rank-deficient set does not blow up."""
    y = outputs.double()
    mu = y.mean(0, keepdim=True)
    centred = y - mu
    cov = centred.T @ centred / y.shape[0]
    e, v = torch.linalg.eigh(cov)
    e = e.clamp_min(max(float(e.max()), 1e-30) * eps)
    weight = torch.diag(e.rsqrt()) @ v.T
    bias = -(mu @ weight.T).squeeze(0)
    return weight.float(), bias.float()


@torch.no_grad()
def extractor_outputs(net: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([net(images[s:s + batch]) for s in range(0, images.shape[0], batch)])


# ---------------------------------------------------------------------------------------------------------------
# Perceptual losses
# ---------------------------------------------------------------------------------------------------------------
#: Watson's (1993) base detection thresholds of the 8x8 DCT frequencies (luminance, 0-255 pixel scale).
WATSON_T = torch.tensor([
    [1.40, 1.01, 1.16, 1.66, 2.40, 3.43, 4.79, 6.56],
    [1.01, 1.45, 1.32, 1.52, 2.00, 2.71, 3.67, 4.93],
    [1.16, 1.32, 2.24, 2.59, 2.98, 3.64, 4.60, 5.88],
    [1.66, 1.52, 2.59, 3.77, 4.55, 5.30, 6.28, 7.60],
    [2.40, 2.00, 2.98, 4.55, 6.15, 7.46, 8.71, 10.17],
    [3.43, 2.71, 3.64, 5.30, 7.46, 9.62, 11.58, 13.51],
    [4.79, 3.67, 4.60, 6.28, 8.71, 11.58, 14.50, 17.29],
    [6.56, 4.93, 5.88, 7.60, 10.17, 13.51, 17.29, 21.15],
])
_RGB2YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def watson_dct(marked: torch.Tensor, reference: torch.Tensor, alpha: float = 0.649, w: float = 0.7,
               beta: float = 4.0, eps: float = 1e-8) -> torch.Tensor:
    """Watson-DCT perceptual distance between images in [0, 1] (mean over the batch of the per-image distance).

    Per channel of YCbCr (0-255, chroma offset 128), per 8x8 block ``b`` and frequency ``k`` of the reference:
    luminance masking ``t_l = T_k (C_b00 / mean C_00)^alpha``, contrast masking ``s = max(t_l, |C_bk|^w t_l^(1-w))``,
    error ``d = (C'_bk - C_bk) / s``, pooled ``(sum_bk |d|^beta)^(1/beta)``; channels are summed.
    """
    h, w_ = marked.shape[-2:]
    pad = (0, (-w_) % 8, 0, (-h) % 8)
    m = _RGB2YCBCR.to(marked)
    offset = torch.tensor([0.0, 128.0, 128.0], dtype=marked.dtype, device=marked.device).view(1, 3, 1, 1)

    def coeffs(x):
        ycc = torch.einsum("ij,bjhw->bihw", m, x * 255) + offset
        ycc = F.pad(ycc, pad, mode="replicate")
        c = block_dct(ycc)
        b, ch, hh, ww = c.shape
        return c.reshape(b, ch, hh // 8, 8, ww // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, ch, -1, 8, 8)

    c_ref, c_mark = coeffs(reference), coeffs(marked)
    t = WATSON_T.to(marked)
    dc = c_ref[..., 0, 0].clamp_min(eps)  # [B, C, blocks]
    lum = (dc / dc.mean(-1, keepdim=True)) ** alpha
    t_l = t * lum[..., None, None]
    s = torch.maximum(t_l, (c_ref.abs() + eps) ** w * t_l ** (1 - w))
    d = (c_mark - c_ref) / s
    dist = ((d.abs() ** beta).sum((-3, -2, -1)) + eps) ** (1 / beta)  # [B, C]
    return dist.sum(1).mean()


class Perceptual(PerceptualLoss):
    """The image term of the decoder fine-tuning between ``D_w(z)`` and ``D_0(z)`` (images in [0, 1]): the shared
    kinds plus ``"watson_dct"`` (the default)."""

    def __init__(self, kind: str, device: Any = "cpu"):
        super().__init__(kind, device, owner="stable_signature",
                         offline="perceptual = 'watson_dct' (the default) or 'ssim'")

    def __call__(self, marked: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        if self.kind == "watson_dct":
            return watson_dct(marked, clean)
        return super().__call__(marked, clean)


# ---------------------------------------------------------------------------------------------------------------
# Extractor files (a pre-trained extractor can be reused, e.g. one shipped by the zoo)
# ---------------------------------------------------------------------------------------------------------------
def save_extractor(path, decoder: HiddenDecoder, cfg: HiddenConfig) -> None:
    """Write a (not yet whitened) HiDDeN decoder and its architecture to a safetensors file."""
    from safetensors.torch import save_file

    save_file(state_tensors("decoder", decoder), str(path), metadata={"arch": json.dumps(cfg.arch())})


def load_extractor(path) -> tuple[HiddenDecoder, HiddenConfig]:
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"stable_signature: extractor_path = {str(path)!r}: no such file")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    if "arch" not in meta:
        raise UserError(f"stable_signature: extractor_path = {str(path)!r} has no 'arch' metadata (write it with "
                        f"markbench.defenses.stable_signature.save_extractor)")
    cfg = config_from_arch(json.loads(meta["arch"]))
    return load_prefixed(cfg.build_decoder(), load_file(str(p)), "decoder"), cfg


# ---------------------------------------------------------------------------------------------------------------
# The defence
# ---------------------------------------------------------------------------------------------------------------
_SQRT03, _SQRT07 = round(math.sqrt(0.3), 4), round(math.sqrt(0.7), 4)


@defenses.register("stable_signature")
class StableSignature(Defense):
    """Stable Signature (Fernandez et al., ICCV 2023, arXiv 2303.15435): the VAE decoder is fine-tuned so that every
    image it decodes carries a fixed 48-bit key, read by a pre-trained, whitened HiDDeN extractor.

    ``embed`` trains the extractor (or loads one from ``extractor_path``), whitens it on clean images, fine-tunes
    the VAE decoder on latents of clean images with ``BCE(10 * W(D_w(z)), key) + 0.2 * perceptual(D_w(z), D_0(z))``
    and returns the pipeline with that decoder. Verification is black box: ``W(x) > 0``. Defaults are the paper's;
    the tiny world's settings live in ``configs/stable-signature-tiny.toml``. Substitution: Watson-VGG (no weights
    offline) is replaced by a Watson-DCT distance; see ``docs/stable_signature.md``.
    """

    version = "1"
    location = MarkLocation.VAE_DECODER
    threat = ThreatSetting.WEIGHTS
    verification = Verification.BLACK_BOX
    detection = DetectionKind.BITS
    uses_data = True  # extractor covers and decoder latents from the run's prompts and size

    bits: int = param(48, "key length (paper 48)", low=1, high=1024)
    # -- data ----------------------------------------------------------------------------------------------
    train_source: str = param("dataset", "training images: a dataset (paper: COCO) or images the pipeline generates",
            choices=("dataset", "generated"))
    dataset: str = param("tiny:train", "training images when train_source = 'dataset'")
    gen_inference_steps: int = param(50, "sampling steps when train_source = 'generated'", low=1, high=1000)
    gen_guidance_scale: float = param(7.5, "guidance scale when train_source = 'generated'", low=0.0, high=50.0)
    # -- extractor (revisited HiDDeN) ------------------------------------------------------------------------
    extractor_path: str = param("", "a pre-trained extractor (safetensors from save_extractor); empty: train one in "
            "embed", names_model="file")
    extractor_image_size: int = param(256, "extractor training side (official 256); 0 = the run's resolution", low=0,
            high=4096)
    extractor_train_images: int = param(82_783, "extractor training images (official: COCO train2014)", low=1,
            high=100_000_000)
    extractor_steps: int = param(194_100, "extractor steps (300 epochs of 82,783 images at batch 128)", low=0,
            high=100_000_000)
    extractor_batch_size: int = param(128, "extractor batch (official 16 x 8 GPUs)", low=1, high=65536)
    extractor_optimizer: str = param("lamb", "extractor optimiser (official LAMB, from timm)",
            choices=("lamb", "adam", "adamw"))
    extractor_lr: float = param(5e-3, "extractor learning rate (official LAMB 2e-2 x batch/512)", low=0.0, high=1.0)
    extractor_warmup: int = param(3235, "extractor linear warm-up steps (official 5 epochs), then half-cosine to 1e-6",
            low=0, high=100_000_000)
    extractor_encoder_blocks: int = param(4, "extractor-training encoder blocks (official 4)", low=1, high=64)
    extractor_encoder_channels: int = param(64, "extractor-training encoder width (official 64)", low=1, high=4096)
    extractor_decoder_blocks: int = param(8, "extractor blocks before the k-channel block (official 8)", low=1, high=64)
    extractor_decoder_channels: int = param(64, "extractor width (official 64)", low=1, high=4096)
    extractor_strength: float = param(0.068, "encoder residual amplitude in [0, 1] pixel units (official scaling_w 0.3 "
            "in ImageNet-normalised units x std 0.226)", low=0.0, high=10.0)
    extractor_bn_momentum: float = param(0.01, "BatchNorm momentum (official 0.01)", low=0.0, high=1.0)
    extractor_noise_layers: list[str] = param(["identity", "hflip", "crop", "crop", "resize", "resize", "jpeg", "jpeg"],
            "augmentations, one drawn per mini-batch (repeats weight the draw: the official 8 equiprobable "
            "choices): " + ", ".join(NOISE_LAYERS))
    extractor_crop_fraction: list[float] = param([0.3, 0.7], "crop: kept area fractions (official)")
    extractor_resize_scale: list[float] = param([_SQRT03, _SQRT07], "resize: side scales (area 0.3/0.7)")
    extractor_jpeg_quality: list[int] = param([50, 80], "JPEG qualities (official 50 / 80)")
    extractor_jpeg_mode: str = param("ste", "JPEG noise: straight-through real codec (official), JPEG-Mask or kornia's "
            "differentiable JPEG", choices=JPEG_MODES)
    # -- whitening -----------------------------------------------------------------------------------------
    whiten_images: int = param(10_000, "clean images the whitening is estimated on (at most the extractor's training "
            "images)", low=2, high=100_000_000)
    # -- decoder fine-tuning -------------------------------------------------------------------------------
    image_size: int = param(256, "fine-tuning image side (official 256); 0 = the run's resolution", low=0, high=4096)
    steps: int = param(100, "fine-tuning steps (paper 100)", low=0, high=10_000_000)
    batch_size: int = param(4, "fine-tuning batch (official 4)", low=1, high=4096)
    lr: float = param(5e-4, "AdamW learning rate (paper 5e-4)", low=0.0, high=1.0)
    warmup: int = param(20, "linear warm-up steps, then half-cosine to 1e-6 (official 20)", low=0, high=10_000_000)
    weight_decay: float = param(0.01, "AdamW weight decay (torch default, as the official optimiser)", low=0.0,
            high=10.0)
    clamp: bool = param(True, "clamp the fine-tuned decoder's images to [0, 1] before the extractor (what the pipeline "
            "delivers; the official code does not clamp)")
    loss_temperature: float = param(10.0, "BCE on temperature x logits (official 10)", low=1e-6, high=1e6)
    message_weight: float = param(1.0, "lambda_w (paper 1)", low=0.0, high=1e6)
    perceptual: str = param("watson_dct", "image loss: Watson-DCT (offline stand-in for the paper's Watson-VGG), "
            "1-SSIM, MSE, LPIPS (needs lpips + weights) or none",
            choices=("watson_dct", "ssim", "mse", "lpips", "none"))
    perceptual_weight: float = param(0.2, "lambda_i (paper 0.2)", low=0.0, high=1e6)

    smoke_params = dict(
        bits=8, extractor_image_size=0, extractor_train_images=8, extractor_steps=2, extractor_batch_size=2,
        extractor_optimizer="adam", extractor_warmup=0, extractor_encoder_blocks=1, extractor_encoder_channels=4,
        extractor_decoder_blocks=1, extractor_decoder_channels=4, extractor_noise_layers=["identity", "jpeg"],
        whiten_images=8, image_size=0, steps=2, batch_size=2, warmup=0,
    )

    def __init__(self, **given: Any):
        super().__init__(**given)
        self.extractor_config()  # refuse bad noise settings at construction
        self._cache: dict[str, Extractor] = {}

    # -- pieces ------------------------------------------------------------------------------------------------
    def extractor_config(self) -> HiddenConfig:
        noise = NoiseLayers(tuple(self.extractor_noise_layers), tuple(float(v) for v in self.extractor_crop_fraction),
                            (0.3,), (0.3,), tuple(float(v) for v in self.extractor_resize_scale), (2.0,),
                            tuple(int(q) for q in self.extractor_jpeg_quality), self.extractor_jpeg_mode)
        return HiddenConfig(
            bits=self.bits, encoder_blocks=self.extractor_encoder_blocks,
            encoder_channels=self.extractor_encoder_channels, decoder_blocks=self.extractor_decoder_blocks,
            decoder_channels=self.extractor_decoder_channels, activation="gelu", encoder_output="residual",
            strength=self.extractor_strength, bn_momentum=self.extractor_bn_momentum, bn_eps=1e-3,
            discriminator=False, image_loss_weight=0.0, adversarial_weight=0.0, message_loss="bce",
            temperature=1.0, optimizer=self.extractor_optimizer, lr=self.extractor_lr, weight_decay=0.0,
            schedule="cosine", warmup=self.extractor_warmup, min_lr=1e-6,
            batch_size=self.extractor_batch_size, steps=self.extractor_steps, noise=noise)

    @staticmethod
    def _size(value: int, ctx) -> int:
        return int(value) or int(ctx.data.height if ctx.data is not None else 64)

    def _images(self, ctx, pipe, n: int, size: int, gen: torch.Generator, return_latents: bool = False):
        return training_images(ctx, self.train_source, self.dataset, n, size, pipe, gen,
                               self.gen_inference_steps, self.gen_guidance_scale, who="stable_signature",
                               return_latents=return_latents)

    def finetune_decoder(self, vae, extractor: nn.Module, key: torch.Tensor, latents: torch.Tensor, ctx,
                         gen: torch.Generator) -> dict[str, float]:
        """Fine-tune ``vae.decoder`` and ``vae.post_quant_conv`` in place so that ``extractor(D_w(z))`` reads
        ``key``; ``latents`` are unscaled posterior modes. Returns training statistics."""
        frozen = copy.deepcopy(vae).eval().requires_grad_(False)
        vae.requires_grad_(False)
        params = [p for p in vae.decoder.parameters()]
        if getattr(vae, "post_quant_conv", None) is not None:
            params += list(vae.post_quant_conv.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        steps = self.steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, steps, self.warmup, "cosine", self.lr, 1e-6))
        perceptual = Perceptual(self.perceptual, latents.device)
        extractor.to(latents.device)
        keys = key.float()[None].to(latents.device)
        vae.decoder.train()
        bsz = self.batch_size
        accs, w_losses, i_losses = [], [], []
        for _ in ctx.progress(range(steps), total=steps, description="stable_signature: decoder fine-tuning"):
            idx = torch.randint(0, latents.shape[0], (bsz,), generator=gen)
            z = latents[idx]
            with torch.no_grad():
                clean = (frozen.decode(z).sample + 1) / 2
            marked = (vae.decode(z).sample + 1) / 2
            logits = extractor(marked.clamp(0, 1) if self.clamp else marked)
            loss_w = F.binary_cross_entropy_with_logits(logits * self.loss_temperature,
                                                        keys.expand_as(logits))
            loss = self.message_weight * loss_w
            loss_i = marked.new_zeros(())
            if self.perceptual != "none" and self.perceptual_weight > 0:
                loss_i = perceptual(marked, clean)
                loss = loss + self.perceptual_weight * loss_i
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stable_signature: fine-tuning loss became {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            accs.append(float(((logits.detach() > 0) == (keys > 0.5)).float().mean()))
            w_losses.append(float(loss_w.detach()))
            i_losses.append(float(loss_i.detach()))
        vae.eval().requires_grad_(False)
        del frozen
        tail = max(1, len(accs) // 10)
        mean = lambda v: float(sum(v[-tail:]) / len(v[-tail:])) if v else float("nan")  # noqa: E731
        return {"finetune_train_bit_accuracy": mean(accs), "finetune_loss_w": mean(w_losses),
                "finetune_loss_i": mean(i_losses), "trainable_params": float(sum(p.numel() for p in params))}

    # -- Defense API -------------------------------------------------------------------------------------------
    def embed(self, pipe, ctx) -> Embedding:
        with forked_global_rng(ctx.generator):
            return self._embed(pipe, ctx)

    def _embed(self, pipe, ctx) -> Embedding:
        vae = pipe.vae
        if vae.dtype != torch.float32:
            raise UserError("stable_signature fine-tunes the VAE decoder in float32: set model.dtype = \"float32\"")
        t0 = time.perf_counter()
        n_bits = self.bits
        key = torch.randint(0, 2, (n_bits,), generator=ctx.generator).bool()
        g_data, g_ext, g_ft, g_gen = (sub_generator(ctx.generator) for _ in range(4))

        # 1. extractor
        stats: dict[str, float] = {}
        if self.extractor_path:
            decoder, cfg = load_extractor(self.extractor_path)
            if decoder.bits != n_bits:
                raise UserError(f"stable_signature: extractor_path has {decoder.bits} bits, bits = {n_bits}")
            ext_images = None
        else:
            cfg = self.extractor_config()
            ext_images = self._images(ctx, pipe, self.extractor_train_images,
                                      self._size(self.extractor_image_size, ctx), g_data)
            trained = train_hidden(ext_images, cfg, g_ext, ctx.progress, "stable_signature: extractor",
                                   device=vae.device)
            decoder = trained.decoder
            stats.update({f"extractor_{k}": v for k, v in trained.stats.items()})
        t1 = time.perf_counter()

        # 2. fine-tuning images and latents; whitening on clean images
        size = self._size(self.image_size, ctx)
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        if size % factor:
            raise UserError(f"stable_signature: image_size {size} is not a multiple of the VAE's scale factor "
                            f"{factor}")
        n_ft = self.steps * self.batch_size
        generated = self.train_source == "generated"
        ft_images, latents = self._images(ctx, pipe, max(1, n_ft), size, g_gen, return_latents=True) \
            if generated else (self._images(ctx, pipe, max(1, n_ft), size, g_gen), None)
        white_src = ext_images if ext_images is not None else ft_images
        white_src = white_src[: self.whiten_images]
        extractor = Extractor(decoder).eval()
        w, b = whitening(extractor_outputs(decoder, white_src))
        with torch.no_grad():
            extractor.whiten.weight.copy_(w)
            extractor.whiten.bias.copy_(b)
        extractor.requires_grad_(False)
        if latents is None:  # the paper: posterior modes of clean images
            with torch.no_grad():
                x = (ft_images * 2 - 1).to(vae.device, vae.dtype)
                latents = torch.cat([vae.encode(x[s:s + 16]).latent_dist.mode() for s in range(0, x.shape[0], 16)])
        latents = latents.to(vae.device, vae.dtype)
        t2 = time.perf_counter()

        # 3. decoder fine-tuning
        stats.update(self.finetune_decoder(vae, extractor, key, latents, ctx, g_ft))
        t3 = time.perf_counter()
        with torch.no_grad():
            probe = latents[:16]
            marked = quantize8((vae.decode(probe).sample + 1) / 2)
            acc = float(((extractor(marked) > 0).cpu() == key[None]).float().mean())
        stats["bit_accuracy_train_latents"] = acc
        extractor.cpu()  # the secret and detection live on the CPU

        tensors = {"message": key, **state_tensors("extractor", extractor)}
        meta = {"method": "stable_signature", "arch": cfg.arch(), **{k: float(v) for k, v in stats.items()}}
        ctx.record_cost(steps=self.steps, extractor_steps=0 if self.extractor_path else cfg.steps,
                        trainable_params=int(stats["trainable_params"]), extractor_seconds=t1 - t0,
                        data_seconds=t2 - t1, finetune_seconds=t3 - t2, bit_accuracy_train=acc)
        return Embedding(Secret(tensors, meta), pipeline=pipe)

    def extractor(self, secret: Secret) -> Extractor:
        """The whitened extractor rebuilt from the secret alone (cached per secret)."""
        key = digest({k: v for k, v in secret.tensors.items() if k.startswith("extractor.")})
        if key not in self._cache:
            cfg = config_from_arch(secret.meta["arch"])
            self._cache = {key: load_prefixed(Extractor(cfg.build_decoder()), secret.tensors, "extractor")}
        return self._cache[key]

    def logits(self, secret: Secret, images: torch.Tensor) -> torch.Tensor:
        """The whitened extractor's outputs ``[N, k]`` (bits are ``> 0``)."""
        net = self.extractor(secret)
        return extractor_outputs(net, images.float(), batch=16)

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        return Detection(bits=(self.logits(secret, images) > 0).cpu())
