"""Differentiable noise layers for training watermark encoders and decoders (HiDDeN, Stable Signature's extractor,
AquaLoRA's decoder), and the real JPEG codec that the ``jpeg`` image attack applies.

One home for what several defences train through (CONVENTIONS 12 and 15): random crop / cropout / dropout, resize,
Gaussian blur (sigma-parameterised, radius ``ceil(3 sigma)``: HiDDeN's noise layer), horizontal flip and three JPEG
modes (``"mask"``: HiDDeN's JPEG-Mask; ``"ste"``: the real codec forward with an identity gradient; ``"kornia"``:
kornia's differentiable approximation), drawn per mini-batch by :class:`NoiseLayers`. :func:`pil_jpeg` is the real
codec (Pillow / libjpeg), also used by the ``jpeg`` image attack. All randomness comes from the caller's
``torch.Generator``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

NOISE_LAYERS = ("identity", "crop", "cropout", "dropout", "resize", "blur", "hflip", "jpeg")
JPEG_MODES = ("mask", "ste", "kornia")


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _randint(high: int, gen: torch.Generator) -> int:
    """Uniform integer in [0, high] (inclusive)."""
    return int(torch.randint(0, high + 1, (1,), generator=gen))


def _square(h: int, w: int, fraction: float) -> tuple[int, int]:
    """Side lengths of a window covering ``fraction`` of the area (same relative side on both axes)."""
    r = math.sqrt(min(max(fraction, 0.0), 1.0))
    return max(1, min(h, int(round(h * r)))), max(1, min(w, int(round(w * r))))


def crop(images: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Keep a random window of area ``fraction`` (the result is smaller). One window per batch."""
    h, w = images.shape[-2:]
    ch, cw = _square(h, w, fraction)
    top, left = _randint(h - ch, gen), _randint(w - cw, gen)
    return images[..., top:top + ch, left:left + cw]


def cropout(encoded: torch.Tensor, cover: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A random window of area ``fraction`` from the encoded image, everything else from the cover."""
    h, w = encoded.shape[-2:]
    ch, cw = _square(h, w, fraction)
    top, left = _randint(h - ch, gen), _randint(w - cw, gen)
    mask = torch.zeros((1, 1, h, w), dtype=encoded.dtype, device=encoded.device)
    mask[..., top:top + ch, left:left + cw] = 1
    return encoded * mask + cover * (1 - mask)


def dropout(encoded: torch.Tensor, cover: torch.Tensor, keep: float, gen: torch.Generator) -> torch.Tensor:
    """Keep each pixel (all channels together) of the encoded image with probability ``keep``; the others are the
    cover's. A fresh mask per image."""
    b, _, h, w = encoded.shape
    mask = (torch.rand((b, 1, h, w), generator=gen) < keep).to(encoded)
    return encoded * mask + cover * (1 - mask)


def resize(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Rescale both sides by ``scale`` (bilinear, antialiased when shrinking). The decoder reads any size."""
    h, w = images.shape[-2:]
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)


def separable_gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with a ``kernel_size`` kernel (computed in float64, then cast to
    the images' dtype), reflect padding (replicate when the image is too small), rows then columns. The image
    attacks' blur (``gaussian_blur``, ``sharpen``'s unsharp mask); ``kernel_size <= 1`` is the identity."""
    if kernel_size <= 1:
        return x.clone()
    half = (kernel_size - 1) / 2.0
    t = torch.linspace(-half, half, kernel_size, dtype=torch.float64, device=x.device)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = (k1 / k1.sum()).to(x.dtype)
    c, h, w = x.shape[1:]
    pad = kernel_size // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    y = F.pad(x, (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, k1.view(1, 1, kernel_size, 1).expand(c, 1, kernel_size, 1), groups=c)
    return F.conv2d(y, k1.view(1, 1, 1, kernel_size).expand(c, 1, 1, kernel_size), groups=c)


def gaussian_blur_sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`separable_gaussian_blur` with the kernel its sigma asks for, side ``2 * ceil(3 sigma) + 1`` (at least
    3): ``sharpen``'s unsharp mask and ``averaging``'s high-pass."""
    return separable_gaussian_blur(x, 2 * max(1, math.ceil(3.0 * sigma)) + 1, sigma)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (kernel radius ceil(3 sigma), clamped to the image, reflect padding): the training
    noise layer. A deliberate near-copy of :func:`separable_gaussian_blur` (its kernel in the images' dtype, columns
    first): the shipped embeddings were trained with exactly these numerics, so it is kept as it is."""
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, (min(images.shape[-2:]) - 1))
    if radius < 1:
        return images
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def pil_jpeg(images: torch.Tensor, quality: int, subsampling: str = "4:2:0") -> torch.Tensor:
    """The real codec: 8-bit quantise, encode with Pillow at ``quality``, decode. Not differentiable."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arrays)
    for i, arr in enumerate(arrays):
        buf = io.BytesIO()
        Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=int(quality), subsampling=subsampling)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.dtype).div(255).to(images.device)


def jpeg_ste(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Forward ASL / straight-through JPEG: the real codec's output forward, the identity's gradient backward."""
    return images + (pil_jpeg(images, quality) - images).detach()


def jpeg_kornia(images: torch.Tensor, quality: int) -> torch.Tensor:
    """kornia's differentiable JPEG approximation at ``quality`` (inputs clamped to [0, 1])."""
    from kornia.enhance import jpeg_codec_differentiable

    q = torch.tensor([float(quality)], dtype=images.dtype, device=images.device)
    return jpeg_codec_differentiable(images.clamp(0, 1), q)


_RGB2YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])


def _dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (rows = frequencies): ``C = D X D^T``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def block_dct(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """8x8 block (inverse) DCT of ``[B, C, H, W]`` with H, W multiples of 8."""
    b, c, h, w = x.shape
    d = _dct_matrix(8).to(x)
    blocks = x.reshape(b, c, h // 8, 8, w // 8, 8)
    if inverse:
        out = torch.einsum("ki,bcykxl,lj->bcyixj", d, blocks, d)
    else:
        out = torch.einsum("ik,bcykxl,jl->bcyixj", d, blocks, d)
    return out.reshape(b, c, h, w)


def jpeg_mask(images: torch.Tensor, keep: tuple[int, int, int] = (5, 3, 3)) -> torch.Tensor:
    """HiDDeN's JPEG-Mask: YUV, 8x8 DCT, keep the ``keep[c] x keep[c]`` lowest frequencies of channel c (paper: 5x5
    = 25 coefficients of Y, 3x3 = 9 of U and V), zero the rest, invert. Differentiable."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    x = F.pad(images, (0, pw, 0, ph))
    m = _RGB2YUV.to(x)
    coeffs = block_dct(torch.einsum("ij,bjhw->bihw", m, x))
    mask = torch.zeros((3, 8, 8), dtype=x.dtype, device=x.device)
    for c, k in enumerate(keep):
        mask[c, :k, :k] = 1
    tiled = mask.repeat(1, x.shape[-2] // 8, x.shape[-1] // 8)
    rgb = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m), block_dct(coeffs * tiled, inverse=True))
    return rgb[..., :h, :w]


def jpeg(images: torch.Tensor, quality: int, mode: str) -> torch.Tensor:
    if mode == "mask":
        return jpeg_mask(images)
    if mode == "ste":
        return jpeg_ste(images, quality)
    if mode == "kornia":
        return jpeg_kornia(images, quality)
    raise ValueError(f"unknown JPEG mode {mode!r}; allowed: {', '.join(JPEG_MODES)}")


@dataclass
class NoiseLayers:
    """The noise layers of one training run: ``layers`` to draw from (uniformly, one per mini-batch) and, per layer,
    the strengths to draw from (uniformly). Crop/cropout fractions are areas; resize values are side scales."""

    layers: tuple[str, ...] = ("identity",)
    crop: tuple[float, ...] = (0.035,)
    cropout: tuple[float, ...] = (0.3,)
    dropout: tuple[float, ...] = (0.3,)
    resize: tuple[float, ...] = (0.7, 0.8)
    blur: tuple[float, ...] = (2.0,)
    jpeg_quality: tuple[int, ...] = (50,)
    jpeg_mode: str = "mask"

    def __post_init__(self):
        bad = [n for n in self.layers if n not in NOISE_LAYERS]
        if bad or not self.layers:
            raise UserError(f"noise layers {list(self.layers)!r}: unknown {bad!r}; allowed: "
                            f"{', '.join(NOISE_LAYERS)}")
        if self.jpeg_mode not in JPEG_MODES:
            raise UserError(f"jpeg mode {self.jpeg_mode!r}; allowed: {', '.join(JPEG_MODES)}")
        for name in ("crop", "cropout", "dropout", "resize", "blur", "jpeg_quality"):
            if not getattr(self, name):
                raise UserError(f"noise layer '{name}' needs at least one strength")

    def apply(self, encoded: torch.Tensor, cover: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, str]:
        """One noise layer drawn from ``layers`` (and one of its strengths) applied to the whole batch."""
        name = self.layers[_randint(len(self.layers) - 1, gen)]

        def pick(values):
            return values[_randint(len(values) - 1, gen)]

        if name == "identity":
            return encoded, name
        if name == "crop":
            return crop(encoded, float(pick(self.crop)), gen), name
        if name == "cropout":
            return cropout(encoded, cover, float(pick(self.cropout)), gen), name
        if name == "dropout":
            return dropout(encoded, cover, float(pick(self.dropout)), gen), name
        if name == "resize":
            return resize(encoded, float(pick(self.resize))), name
        if name == "blur":
            return gaussian_blur(encoded, float(pick(self.blur))), name
        if name == "hflip":
            return encoded.flip(-1), name
        return jpeg(encoded, int(pick(self.jpeg_quality)), self.jpeg_mode), name


def quantize8(images: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8 bits (what a PNG between stages holds)."""
    return (images.clamp(0, 1) * 255).round() / 255
