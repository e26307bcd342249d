"""HiDDeN: a learned post-hoc image watermark (encoder, noise layers, decoder, optional adversary).

Zhu, Kaplan, Johnson and Fei-Fei, "HiDDeN: Hiding Data With Deep Networks", ECCV 2018, arXiv 1807.09937. Facts
were checked against the PyTorch reimplementation ``ando-khachatryan/HiDDeN`` and the revisited HiDDeN inside
``facebookresearch/stable_signature/hidden`` (both read for facts only; this file is written afresh).

Networks (the paper's supplementary material, Sec. A; every block is Conv 3x3 stride 1 pad 1 - BatchNorm - ReLU):

* **Encoder** ``E(I, M)``: 4 blocks of 64 channels on the cover image; the L-bit message is replicated spatially to
  an ``L x H x W`` volume and concatenated with those features and the cover itself; one more block (64); a final
  1x1 convolution to 3 channels, no activation. The paper's encoder outputs the encoded image itself
  (``encoder_output = "image"``); the revisited HiDDeN of Stable Signature outputs a residual added as
  ``I + strength * tanh(E(I, M))`` (``"residual"``).
* **Decoder** ``D(I_no)``: 7 blocks of 64 channels, one block with L channels, global average pooling, a linear
  ``L x L`` layer. Average pooling makes it independent of the image size (so crops and resizes are decodable).
* **Adversary** (optional): 3 blocks of 64 channels, global average pooling, a linear layer to one logit
  (cover vs encoded; the paper's two-class logits, written as one binary logit as the PyTorch reimplementation
  does).

Noise layers (:class:`bench.noise.NoiseLayers`, the shared toolkit; one layer, and one of its strengths, drawn uniformly per mini-batch as in the
paper's "combined" model; every strength list below is "one of"):

* ``identity``;
* ``crop``: keep a random square window of area fraction ``p`` (the output is smaller; paper Crop(p = 0.035));
* ``cropout``: a random square of area fraction ``p`` from the encoded image, the rest from the cover (Cropout(0.3));
* ``dropout``: keep each pixel of the encoded image with probability ``p``, the others from the cover
  (Dropout(0.3));
* ``resize``: rescale the side by ``s`` (bilinear, antialiased; not in the 2018 paper: the PyTorch
  reimplementation's combined experiments use 0.7-0.8, Stable Signature's extractor sqrt(0.3) and sqrt(0.7));
* ``blur``: Gaussian blur of standard deviation sigma (Gaussian(sigma = 2));
* ``hflip``: horizontal flip (in Stable Signature's extractor training);
* ``jpeg``: three modes. ``"mask"``: the paper's JPEG-Mask (YUV, 8x8 DCT, keep the 5x5 lowest frequencies of Y
  and the 3x3 of U and V, zero the rest, invert); ``"ste"``: the real codec (Pillow/libjpeg at the drawn quality)
  in the forward pass with an identity gradient, i.e. the forward-ASL trick of Zhang et al. (ACM MM 2021) that
  Stable Signature's revisited HiDDeN uses; ``"kornia"``: kornia's differentiable JPEG approximation
  (``kornia.enhance.jpeg_codec_differentiable``, Reich et al. 2024) at the drawn quality.

Losses (paper): ``lambda_M * MSE(M', M) + lambda_I * MSE(I_en, I_co) + lambda_G * adversarial``, with ``lambda_I =
0.7``, ``lambda_G = 0.001``, messages in {0, 1}, a bit read as ``M' > 0.5``. ``message_loss = "bce"`` (with a
temperature) is the revisited HiDDeN's loss, a bit then read as ``logit > 0``. Adam, lr 1e-3, batch 12.

Inputs: networks take images in [0, 1] and map them to [-1, 1] internally; the encoder sees the message as +-1.
Randomness: every draw (initialisation, batches, messages, noise) comes from the caller's ``torch.Generator``;
network initialisation runs under a forked global RNG seeded from it, so nothing global is seeded or disturbed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from markbench import (Defense, Detection, DetectionKind, Embedding, MarkLocation, param, Secret, ThreatSetting,
                       UserError, Verification)
from markbench.registries import defenses
from markbench.noise import JPEG_MODES, NOISE_LAYERS, NoiseLayers, quantize8
from markbench.packing import digest, load_prefixed, state_tensors
from markbench.rng import forked_global_rng, seeded, sub_generator
from markbench.training import training_images

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------
class ConvBNAct(nn.Sequential):
    """Conv 3x3 (stride 1, padding 1) - BatchNorm - activation: HiDDeN's building block (ReLU in the paper, GELU in
    Stable Signature's revisited HiDDeN)."""

    def __init__(self, c_in: int, c_out: int, activation: str = "relu", bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1):
        super().__init__(nn.Conv2d(c_in, c_out, 3, stride=1, padding=1),
                         nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum),
                         ACTIVATIONS[activation]())


class HiddenEncoder(nn.Module):
    """``E(I, M)``: ``blocks`` Conv-BN-act blocks on the cover, concat with the spatially replicated message (+-1)
    and the cover, one more block, a 1x1 convolution to 3 channels (no activation).

    Returns the raw output in the network's [-1, 1] space; :func:`apply_encoder` turns it into the encoded image.
    """

    def __init__(self, bits: int, blocks: int = 4, channels: int = 64, activation: str = "relu",
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        self.bits = int(bits)
        kw = dict(activation=activation, bn_eps=bn_eps, bn_momentum=bn_momentum)
        layers = [ConvBNAct(3, channels, **kw)] + [ConvBNAct(channels, channels, **kw) for _ in range(blocks - 1)]
        self.features = nn.Sequential(*layers)
        self.after_concat = ConvBNAct(channels + 3 + self.bits, channels, **kw)
        self.final = nn.Conv2d(channels, 3, kernel_size=1)

    def forward(self, images: torch.Tensor, messages: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        m = (messages.float() * 2 - 1)[:, :, None, None].expand(-1, -1, x.shape[-2], x.shape[-1])
        return self.final(self.after_concat(torch.cat([m, self.features(x), x], dim=1)))


class HiddenDecoder(nn.Module):
    """``D(I)``: ``blocks`` Conv-BN-act blocks, one block with ``bits`` channels, global average pooling, a linear
    ``bits x bits`` layer. Works on any image size."""

    def __init__(self, bits: int, blocks: int = 7, channels: int = 64, activation: str = "relu",
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        self.bits = int(bits)
        kw = dict(activation=activation, bn_eps=bn_eps, bn_momentum=bn_momentum)
        layers = [ConvBNAct(3, channels, **kw)] + [ConvBNAct(channels, channels, **kw) for _ in range(blocks - 1)]
        layers += [ConvBNAct(channels, self.bits, **kw), nn.AdaptiveAvgPool2d(1)]
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(self.bits, self.bits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.layers(images * 2 - 1).flatten(1))


class Discriminator(nn.Module):
    """The adversary: ``blocks`` Conv-BN-ReLU blocks, global average pooling, a linear layer to one logit
    (encoded vs cover)."""

    def __init__(self, blocks: int = 3, channels: int = 64):
        super().__init__()
        layers = [ConvBNAct(3, channels)] + [ConvBNAct(channels, channels) for _ in range(blocks - 1)]
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.linear = nn.Linear(channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.layers(images * 2 - 1).flatten(1))


def apply_encoder(encoder: HiddenEncoder, images: torch.Tensor, messages: torch.Tensor, output: str,
                  strength: float) -> torch.Tensor:
    """The encoded image in [0, 1] space (not clamped).

    ``output = "image"`` (paper): the encoder's output is the encoded image; ``strength`` scales its difference to
    the cover (1 = as trained). ``"residual"`` (revisited HiDDeN): ``I + strength * tanh(E(I, M))``.
    """
    raw = encoder(images, messages)
    if output == "image":
        encoded = (raw + 1) / 2
        return encoded if strength == 1.0 else images + strength * (encoded - images)
    return images + strength * torch.tanh(raw)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class HiddenConfig:
    """Architecture and training settings of one HiDDeN encoder/decoder pair (defaults: the paper's)."""

    bits: int = 30
    encoder_blocks: int = 4
    encoder_channels: int = 64
    decoder_blocks: int = 7
    decoder_channels: int = 64
    activation: str = "relu"
    encoder_output: str = "image"
    strength: float = 1.0
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    discriminator: bool = True
    discriminator_blocks: int = 3
    discriminator_channels: int = 64
    message_weight: float = 1.0
    image_loss_weight: float = 0.7
    adversarial_weight: float = 1e-3
    message_loss: str = "mse"
    temperature: float = 1.0
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: int = 0
    min_lr: float = 0.0
    batch_size: int = 12
    steps: int = 333_600
    noise: NoiseLayers = field(default_factory=NoiseLayers)

    @property
    def threshold(self) -> float:
        """Where the decoder's output is cut into bits: 0.5 for the paper's MSE on {0, 1}, 0 for logits."""
        return 0.5 if self.message_loss == "mse" else 0.0

    def arch(self) -> dict[str, Any]:
        """What rebuilding the networks needs (JSON-able, stored in the secret)."""
        return {k: getattr(self, k) for k in ("bits", "encoder_blocks", "encoder_channels", "decoder_blocks",
                                              "decoder_channels", "activation", "encoder_output", "strength",
                                              "bn_momentum", "bn_eps", "message_loss")}

    def build_encoder(self) -> HiddenEncoder:
        return HiddenEncoder(self.bits, self.encoder_blocks, self.encoder_channels, self.activation, self.bn_eps,
                             self.bn_momentum)

    def build_decoder(self) -> HiddenDecoder:
        return HiddenDecoder(self.bits, self.decoder_blocks, self.decoder_channels, self.activation, self.bn_eps,
                             self.bn_momentum)


def config_from_arch(arch: dict[str, Any]) -> HiddenConfig:
    known = {f.name for f in fields(HiddenConfig)}
    return HiddenConfig(**{k: v for k, v in arch.items() if k in known})


@dataclass
class TrainedHidden:
    encoder: HiddenEncoder
    decoder: HiddenDecoder
    config: HiddenConfig
    stats: dict[str, float]


def message_loss(out: torch.Tensor, messages: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """``mse``: MSE between the decoder's output and the {0, 1} message (paper); ``bce``: BCE on ``out /
    temperature`` as logits (revisited HiDDeN)."""
    if kind == "mse":
        return F.mse_loss(out, messages)
    return F.binary_cross_entropy_with_logits(out / temperature, messages)


def _optimizer(params: list[nn.Parameter], cfg: HiddenConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "lamb":
        try:
            from timm.optim import Lamb
        except ImportError as exc:  # pragma: no cover - timm comes with open-clip-torch
            raise UserError("optimizer = 'lamb' needs timm (installed with open-clip-torch); use 'adam'") from exc
        return Lamb(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, steps: int, warmup: int, schedule: str, base: float, min_lr: float) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant or half-cosine down to ``min_lr``."""
    if warmup and step < warmup:
        return step / warmup
    if schedule == "cosine":
        lr = min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        return lr / base if base > 0 else 0.0
    return 1.0


def train_hidden(images: torch.Tensor, cfg: HiddenConfig, gen: torch.Generator,
                 progress: Callable[..., Iterable] | None = None, description: str = "hidden",
                 device: torch.device | str | None = None) -> TrainedHidden:
    """Train an encoder/decoder pair (and the adversary, if enabled) on ``images`` ([N, 3, H, W] in [0, 1]).

    Every sample carries its own random message; one noise layer per mini-batch. Training runs on ``device``
    (default: the images'); every random draw comes from ``gen`` on the CPU, so a run is the same draw for draw on
    any device. Returns the networks in eval mode, on the CPU.
    """
    if images.shape[0] < 1:
        raise UserError("hidden: no training images")
    device = torch.device(device) if device is not None else images.device
    images = images.to(device)
    encoder = seeded(gen, cfg.build_encoder).to(device)
    decoder = seeded(gen, cfg.build_decoder).to(device)
    disc = seeded(gen, lambda: Discriminator(cfg.discriminator_blocks, cfg.discriminator_channels)).to(device) \
        if cfg.discriminator and cfg.adversarial_weight > 0 else None
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = _optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.schedule, cfg.lr, cfg.min_lr))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr) if disc is not None else None
    encoder.train()
    decoder.train()
    if disc is not None:
        disc.train()
    n, b = images.shape[0], cfg.batch_size
    it: Iterable[int] = range(cfg.steps)
    if progress is not None:
        it = progress(it, total=cfg.steps, description=description)
    accs: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    for _ in it:
        idx = torch.randint(0, n, (b,), generator=gen)
        cover = images[idx.to(device)]
        m = torch.randint(0, 2, (b, cfg.bits), generator=gen).float().to(device)
        encoded = apply_encoder(encoder, cover, m, cfg.encoder_output, cfg.strength)
        if disc is not None:
            ones, zeros = torch.ones(b, 1, device=device), torch.zeros(b, 1, device=device)
            opt_d.zero_grad(set_to_none=True)
            d_loss = F.binary_cross_entropy_with_logits(disc(cover), ones) + \
                F.binary_cross_entropy_with_logits(disc(encoded.detach()), zeros)
            d_loss.backward()
            opt_d.step()
        noised, _ = cfg.noise.apply(encoded, cover, gen)
        out = decoder(noised)
        loss = cfg.message_weight * message_loss(out, m, cfg.message_loss, cfg.temperature)
        if cfg.image_loss_weight > 0:
            loss = loss + cfg.image_loss_weight * F.mse_loss(encoded, cover)
        if disc is not None:
            loss = loss + cfg.adversarial_weight * F.binary_cross_entropy_with_logits(disc(encoded), ones)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{description}: loss became {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())  # kept on the device: no copy to the host per step
        accs.append(((out.detach() > cfg.threshold) == (m > 0.5)).float().mean())
    encoder.cpu().eval().requires_grad_(False)
    decoder.cpu().eval().requires_grad_(False)
    tail = max(1, len(accs) // 10)
    stats = {"train_bit_accuracy": float(torch.stack(accs[-tail:]).double().mean()) if accs else float("nan"),
             "final_loss": float(torch.stack(losses[-tail:]).double().mean()) if losses else float("nan")}
    return TrainedHidden(encoder, decoder, cfg, stats)


@torch.no_grad()
def bit_accuracy(decoder: nn.Module, images: torch.Tensor, messages: torch.Tensor, threshold: float,
                 encoder: HiddenEncoder | None = None, cfg: HiddenConfig | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, batch: int = 64) -> float:
    """Mean bit accuracy of ``decoder`` on ``images`` (encoded with ``messages`` first when ``encoder`` is given;
    ``transform`` applied between, e.g. clamping and 8-bit quantisation)."""
    hits, total = 0.0, 0
    for s in range(0, images.shape[0], batch):
        x, m = images[s:s + batch], messages[s:s + batch]
        if encoder is not None:
            x = apply_encoder(encoder, x, m, cfg.encoder_output, cfg.strength)
        if transform is not None:
            x = transform(x)
        bits = decoder(x) > threshold
        hits += float((bits == m.bool()).float().sum())
        total += bits.numel()
    return hits / max(1, total)


# ---------------------------------------------------------------------------------------------------------------
# The defence
# ---------------------------------------------------------------------------------------------------------------
@defenses.register("hidden")
class HiDDeN(Defense):
    """HiDDeN (Zhu et al., ECCV 2018, arXiv 1807.09937): a post-hoc learned watermark: a conv encoder writes an
    L-bit message (replicated spatially) into the image, a conv decoder reads it back after noise layers (crop,
    cropout, dropout, resize, blur, JPEG) that it was trained through; an adversary keeps the marks invisible.

    ``embed`` trains the encoder/decoder pair on clean images (``dataset``, or images the base model generates) and
    draws the message from the stage's generator; the secret holds the message and both networks. ``mark`` encodes
    images at their own size; ``detect`` thresholds the decoder's output. Defaults are the paper's (30 bits, 128 x
    128, 4 x 64 encoder, 7 x 64 decoder, 3 x 64 adversary, lambda_I 0.7, lambda_G 1e-3, Adam 1e-3, batch 12, MSE
    message loss, JPEG-Mask); the tiny world's settings live in the configs. See ``docs/stable_signature.md``.
    """

    version = "1"
    location = MarkLocation.POST_HOC
    threat = ThreatSetting.API
    verification = Verification.BLACK_BOX
    detection = DetectionKind.BITS
    uses_data = True  # training covers: the run's prompts (generated) or a dataset at the run's size

    bits: int = param(HiddenConfig.bits, "message length L (paper: 30 bits at 128 x 128)", low=1, high=1024)
    image_size: int = param(128, "training image side (paper 128); 0 = the run's resolution", low=0, high=4096)
    # -- training data -----------------------------------------------------------------------------------
    train_source: str = param("dataset", "training covers: a dataset, or images the base model generates",
            choices=("dataset", "generated"))
    dataset: str = param("tiny:train", "training covers when train_source = 'dataset' (paper: COCO)")
    train_images: int = param(10_000, "number of training covers (paper: 10,000 COCO images)", low=1, high=10_000_000)
    gen_inference_steps: int = param(50, "sampling steps when train_source = 'generated'", low=1, high=1000)
    gen_guidance_scale: float = param(7.5, "guidance scale when train_source = 'generated'", low=0.0, high=50.0)
    # -- networks ------------------------------------------------------------------------------------------
    encoder_blocks: int = param(HiddenConfig.encoder_blocks, "encoder Conv-BN-ReLU blocks before the message (paper 4)",
            low=1, high=64)
    encoder_channels: int = param(HiddenConfig.encoder_channels, "encoder width (paper 64)", low=1, high=4096)
    decoder_blocks: int = param(HiddenConfig.decoder_blocks, "decoder Conv-BN-ReLU blocks before the L-channel block "
            "(paper 7)", low=1, high=64)
    decoder_channels: int = param(HiddenConfig.decoder_channels, "decoder width (paper 64)", low=1, high=4096)
    activation: str = param(HiddenConfig.activation, "block activation (paper ReLU; revisited HiDDeN GELU)",
            choices=tuple(ACTIVATIONS))
    encoder_output: str = param(HiddenConfig.encoder_output,
            "the encoder outputs the encoded image (paper) or a residual added as I + "
            "strength * tanh(.) (revisited HiDDeN)", choices=("image", "residual"))
    strength: float = param(HiddenConfig.strength,
            "'image': scale of the change at marking (1 = as trained); 'residual': the residual's "
            "amplitude in [0, 1] pixel units (also in training)", low=0.0, high=10.0)
    discriminator: bool = param(HiddenConfig.discriminator, "train with the adversary (paper: yes)")
    discriminator_blocks: int = param(HiddenConfig.discriminator_blocks, "adversary blocks (paper 3)", low=1, high=64)
    discriminator_channels: int = param(HiddenConfig.discriminator_channels, "adversary width (paper 64)", low=1,
            high=4096)
    # -- losses and optimisation ---------------------------------------------------------------------------
    message_loss: str = param(HiddenConfig.message_loss, "MSE on {0,1} messages (paper) or BCE on logits",
            choices=("mse", "bce"))
    image_loss_weight: float = param(HiddenConfig.image_loss_weight, "lambda_I: weight of MSE(encoded, cover) (paper "
            "0.7)", low=0.0, high=1e6)
    adversarial_weight: float = param(HiddenConfig.adversarial_weight, "lambda_G: weight of the adversarial loss "
            "(paper 1e-3)", low=0.0, high=1e6)
    lr: float = param(HiddenConfig.lr, "Adam learning rate (paper 1e-3)", low=0.0, high=1.0)
    lr_schedule: str = param("constant", "learning-rate schedule: constant (paper) or half-cosine to 0",
            choices=("constant", "cosine"))
    batch_size: int = param(HiddenConfig.batch_size, "covers per step (paper 12)", low=1, high=4096)
    steps: int = param(HiddenConfig.steps, "optimisation steps (400 epochs of 10,000 covers at batch 12, the PyTorch "
            "reimplementation's default)", low=0, high=100_000_000)
    bn_momentum: float = param(HiddenConfig.bn_momentum, "BatchNorm running-statistics momentum", low=0.0, high=1.0)
    # -- noise layers --------------------------------------------------------------------------------------
    noise_layers: list[str] = param(["identity", "crop", "cropout", "dropout", "resize", "blur", "jpeg"],
            "noise layers, one drawn per mini-batch (the paper's combined model): " + ", ".join(NOISE_LAYERS))
    crop_fraction: list[float] = param([0.035], "crop: kept area fraction(s) (paper Crop(0.035))")
    cropout_fraction: list[float] = param([0.3], "cropout: encoded area fraction(s) (paper 0.3)")
    dropout_keep: list[float] = param([0.3], "dropout: kept encoded-pixel fraction(s) (paper 0.3)")
    resize_scale: list[float] = param([0.7, 0.8], "resize: side scale(s)")
    blur_sigma: list[float] = param([2.0], "blur: Gaussian sigma(s) in pixels (paper 2)")
    jpeg_mode: str = param("mask", "JPEG noise: JPEG-Mask (paper), straight-through real codec (forward ASL) or "
            "kornia's differentiable JPEG", choices=JPEG_MODES)
    jpeg_quality: list[int] = param([50], "JPEG quality(ies) for 'ste' and 'kornia'")

    smoke_params = dict(bits=8, image_size=0, train_images=8, encoder_blocks=1, encoder_channels=4,
                        decoder_blocks=1, decoder_channels=4, discriminator_blocks=1, discriminator_channels=4,
                        batch_size=2, steps=2)

    def __init__(self, **given: Any):
        super().__init__(**given)
        self.noise()  # refuse bad noise settings at construction
        self._cache: dict[str, tuple[HiddenEncoder, HiddenDecoder, HiddenConfig]] = {}

    def noise(self) -> NoiseLayers:
        return NoiseLayers(tuple(self.noise_layers), tuple(self.crop_fraction), tuple(self.cropout_fraction),
                           tuple(self.dropout_keep), tuple(self.resize_scale), tuple(self.blur_sigma),
                           tuple(self.jpeg_quality), self.jpeg_mode)

    def config(self) -> HiddenConfig:
        """The library's settings from this plugin's parameters (declared once: their defaults are
        :class:`HiddenConfig`'s, the paper's)."""
        shared = {f.name: getattr(self, f.name) for f in fields(HiddenConfig) if f.name in self.params}
        return HiddenConfig(**shared, optimizer="adam", schedule=self.lr_schedule, noise=self.noise())

    def embed(self, pipe, ctx) -> Embedding:
        with forked_global_rng(ctx.generator):
            return self._embed(pipe, ctx)

    def _embed(self, pipe, ctx) -> Embedding:
        t0 = time.perf_counter()
        message = torch.randint(0, 2, (self.bits,), generator=ctx.generator).bool()
        gen_data, gen_train = sub_generator(ctx.generator), sub_generator(ctx.generator)
        size = self.image_size or int(ctx.data.height if ctx.data is not None else 64)
        images = training_images(ctx, self.train_source, self.dataset, self.train_images, size, pipe, gen_data,
                                 self.gen_inference_steps, self.gen_guidance_scale, who="hidden")
        t1 = time.perf_counter()
        cfg = self.config()
        trained = train_hidden(images, cfg, gen_train, ctx.progress, "hidden: training", device=ctx.device)
        t2 = time.perf_counter()
        probe = images[: min(64, images.shape[0])]
        probe_msg = message.float().expand(probe.shape[0], -1)
        acc = bit_accuracy(trained.decoder, probe, probe_msg, cfg.threshold, trained.encoder, cfg, quantize8)
        tensors = {"message": message}
        tensors.update(state_tensors("encoder", trained.encoder))
        tensors.update(state_tensors("decoder", trained.decoder))
        meta = {"method": "hidden", "arch": cfg.arch(), "threshold": cfg.threshold, "image_size": size,
                **trained.stats, "train_bit_accuracy_message": acc}
        n_params = sum(p.numel() for p in trained.encoder.parameters()) + \
            sum(p.numel() for p in trained.decoder.parameters())
        ctx.record_cost(steps=cfg.steps, trainable_params=n_params, train_images=int(images.shape[0]),
                        data_seconds=t1 - t0, train_seconds=t2 - t1, bit_accuracy_train=acc)
        return Embedding(Secret(tensors, meta))

    def networks(self, secret: Secret) -> tuple[HiddenEncoder, HiddenDecoder, HiddenConfig]:
        """Encoder, decoder and settings rebuilt from the secret alone (cached per secret)."""
        key = digest(secret.tensors)
        if key not in self._cache:
            cfg = config_from_arch(secret.meta["arch"])
            enc = load_prefixed(cfg.build_encoder(), secret.tensors, "encoder")
            dec = load_prefixed(cfg.build_decoder(), secret.tensors, "decoder")
            self._cache = {key: (enc, dec, cfg)}
        return self._cache[key]

    def mark(self, images: torch.Tensor, secret: Secret, ctx) -> torch.Tensor:
        enc, _, cfg = self.networks(secret)
        message = secret.tensors["message"].float()
        out = []
        with torch.no_grad():
            for s in range(0, images.shape[0], 16):
                x = images[s:s + 16].float()
                m = message.expand(x.shape[0], -1)
                out.append(apply_encoder(enc, x, m, cfg.encoder_output, cfg.strength).clamp(0, 1))
        return torch.cat(out)

    def decode(self, secret: Secret, images: torch.Tensor) -> torch.Tensor:
        """The decoder's raw outputs ``[N, L]`` (bits are ``> secret.meta['threshold']``)."""
        _, dec, _ = self.networks(secret)
        with torch.no_grad():
            return torch.cat([dec(images[s:s + 16].float()) for s in range(0, images.shape[0], 16)])

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        return Detection(bits=(self.decode(secret, images) > float(secret.meta["threshold"])).cpu())
