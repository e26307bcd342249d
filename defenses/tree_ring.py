"""Tree-Ring: a zero-bit watermark in the Fourier transform of the sampler's initial noise.

Wen, Kirchenbauer, Geiping, Goldstein, "Tree-Ring Watermarks: Fingerprints for Diffusion Images that are Invisible
and Robust", NeurIPS 2023, arXiv 2305.20030 (official code: YuxinWenRick/tree-ring-watermark; read for facts only).

* Key (``pattern = "rings"``, the paper's default "Tree-Ring_Rings"): draw a Gaussian latent, take its centred 2-D
  FFT in the watermark channel, and give every ring ``r - 1 < |f| <= r`` (``r = 1 .. radius``) the value of one of its
  coefficients: concentric rings of constant complex value, invariant to rotations of the image. ``"zeros"`` (Tree-
  Ring_Zeros) and ``"rand"`` (Tree-Ring_Rand: the Gaussian's own coefficients) are the paper's other two patterns.
* Embedding: ``z_T``'s centred FFT in channel ``channel`` takes the key's values inside the disc of radius
  ``radius`` (the mask); the rest of the noise is the image seed's own. The real part of the inverse FFT is the new
  initial noise (the official code's "complex" injection).
* Detection: invert the image to ``z_T`` (:mod:`bench.inversion`: VAE posterior mean, empty prompt, guidance 1,
  DDIM over the sampler's steps) and score the mean L1 distance between its FFT and the key on the mask; the
  harness's score is the *negative* distance (higher = more likely marked). ``score = "pvalue"`` scores with
  ``-log10 p`` instead, where ``p`` is the paper's test (Sec. 3.3): under H0 the inverted coefficients ``y`` on the
  mask are complex Gaussians of variance ``sigma^2 = mean |y|^2``; ``eta = sum |k - y|^2 / sigma^2`` then follows a
  non-central chi-square with ``M`` (the number of masked coefficients) degrees of freedom and non-centrality
  ``lambda = sum |k|^2 / sigma^2``, and ``p = P(chi2(M, lambda) <= eta)`` (the paper defines it; its code never used
  it). Hermitian symmetry makes half of the masked coefficients conjugates of the other half, so this ``p`` is a
  score, not a calibrated p-value; the benchmark reports the empirical ROC either way.

Paper defaults: radius 10 on a 64x64 latent (512 px), channel 3 (the last of SD's four), pattern rings, 50 DDIM
steps for generation and inversion. The radius is a parameter in latent pixels; on a smaller latent the tiny-world
config scales it (``configs/tree-ring-tiny.toml`` says how and why).
"""

from __future__ import annotations

import math

import torch

from markbench import Defense, Detection, DetectionKind, Embedding, MarkLocation, param, Secret
from markbench.registries import defenses
from markbench.generation import initial_latents
from markbench.inversion import INVERSION_METHODS, invert_images, latent_shape
from markbench.plugins import QualityMeasure, ThreatSetting

PATTERNS = ("rings", "zeros", "rand")
SCORES = ("l1", "pvalue")


def circle_mask(h: int, w: int, radius: float) -> torch.Tensor:
    """Bool ``[h, w]``: the disc ``|f| <= radius`` around the centre of a ``fftshift``-ed spectrum."""
    y = torch.arange(h, dtype=torch.float64) - h // 2
    x = torch.arange(w, dtype=torch.float64) - w // 2
    return (y[:, None] ** 2 + x[None, :] ** 2) <= radius ** 2


def fft_latent(z: torch.Tensor) -> torch.Tensor:
    """Centred 2-D FFT over the last two dimensions (complex128)."""
    return torch.fft.fftshift(torch.fft.fft2(z.double()), dim=(-2, -1))


def ifft_latent(f: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real


def make_key(shape: tuple[int, int, int], channel: int, radius: float, pattern: str,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The key spectrum ``[C, h, w]`` (complex) and the mask ``[C, h, w]`` (True only in ``channel``'s disc)."""
    c, h, w = shape
    if not 0 <= channel < c:
        raise ValueError(f"tree_ring: channel {channel} does not exist in a latent of {c} channels")
    if 2 * radius >= min(h, w):
        raise ValueError(f"tree_ring: radius {radius} does not fit a {h}x{w} latent (needs 2 * radius < {min(h, w)})")
    spec = fft_latent(torch.randn(shape, generator=generator, dtype=torch.float64))
    if pattern == "zeros":
        key = torch.zeros_like(spec)
    elif pattern == "rand":
        key = spec.clone()
    elif pattern == "rings":
        key = spec.clone()
        yy = torch.arange(h, dtype=torch.float64)[:, None] - h // 2
        xx = torch.arange(w, dtype=torch.float64)[None, :] - w // 2
        dist = (yy ** 2 + xx ** 2).sqrt()
        for r in range(int(math.ceil(radius)), 0, -1):  # outer rings first; ring r is r-1 < |f| <= r
            ring = dist <= r
            key[:, ring] = spec[:, h // 2, w // 2 + r][:, None]  # one coefficient of the ring's radius
    else:
        raise ValueError(f"tree_ring: unknown pattern {pattern!r}; available: {', '.join(PATTERNS)}")
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[channel] = circle_mask(h, w, radius)
    return key, mask


def inject(z: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Write the key into the masked Fourier coefficients of each latent ``[N, C, h, w]``."""
    f = fft_latent(z)
    f[:, mask] = key[mask].to(f.dtype)
    return ifft_latent(f).to(z.dtype)


def l1_distance(z: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|FFT(z) - key|`` over the mask, per latent (the paper's detection statistic; lower = marked)."""
    return (fft_latent(z)[:, mask] - key[mask]).abs().mean(dim=1)


def p_values(z: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's non-central chi-square p-value per latent (see the module docstring)."""
    from scipy.stats import ncx2

    y = fft_latent(z)[:, mask]
    k = key[mask].to(y.dtype)
    sigma2 = (y.abs() ** 2).mean(dim=1).clamp_min(1e-12)
    eta = ((k[None] - y).abs() ** 2).sum(dim=1) / sigma2
    lam = (k.abs() ** 2).sum() / sigma2
    m = int(mask.sum())
    return torch.tensor(ncx2.cdf(eta.numpy(), m, lam.numpy()), dtype=torch.float64)


@defenses.register("tree_ring")
class TreeRing(Defense):
    """Tree-Ring (Wen et al., NeurIPS 2023, arXiv 2305.20030): a ring key in the FFT of one channel of the initial
    noise, detected by DDIM inversion and an L1 distance on the key's disc (zero-bit: AUC, TPR at empirical FPR).

    Paper defaults: radius 10 (64x64 latent), channel 3, the "rings" pattern, 50 inversion steps. The detection
    score is ``-L1`` (or ``-log10 p`` of the paper's non-central chi-square test, ``score = "pvalue"``). Protects a
    model served behind an API (the provider samples): released weights are sampled without the key.
    """

    version = "1"
    location = MarkLocation.INITIAL_NOISE
    detection = DetectionKind.SCORE
    threat = ThreatSetting.API
    quality_measures = (QualityMeasure.DISTRIBUTION,)
    uses_data = True  # the key's size is the latent's, read from the pipeline at the run's image size
    radius: float = param(10.0, "radius of the key's disc in the centred FFT, in latent pixels", low=1.0, high=512.0)
    channel: int = param(3, "latent channel carrying the key", low=0, high=63)
    pattern: str = param("rings", "key pattern: rings (paper default), zeros or rand", choices=PATTERNS)
    score: str = param("l1", "detection score: -L1 distance (paper) or -log10 p (non-central chi-square)",
            choices=SCORES, verifier=True)
    inversion: str = param("ddim", "inversion: plain DDIM or exact (fixed-point)", choices=INVERSION_METHODS,
                           verifier=True)
    inversion_steps: int = param(0, "DDIM inversion steps; 0 = the run's sampler steps (paper: 50 and 50)", low=0,
            high=1000, verifier=True)
    fixed_point_iters: int = param(3, "fixed-point iterations per step of the exact inversion", low=1, high=50,
                                   verifier=True)
    decoder_inversion_steps: int = param(0, "gradient steps of decoder inversion before the DDIM inversion (Hong et al. "
                                         "2024); 0 = the encoder's posterior mean alone (the paper's)", low=0,
                                         high=5000, keyed_at_default=False, verifier=True)
    decoder_inversion_lr: float = param(0.05, "Adam learning rate of decoder inversion (cosine to 0)", low=1e-5,
                                        high=1.0, keyed_at_default=False, verifier=True)
    smoke_params = {"radius": 2.0, "channel": 0, "inversion_steps": 2}

    def embed(self, pipe, ctx) -> Embedding:
        shape = latent_shape(pipe, ctx.data.height, ctx.data.width)
        key, mask = make_key(shape, self.channel, self.radius, self.pattern, ctx.generator)
        return Embedding(Secret({"key_real": key.real.float(), "key_imag": key.imag.float(), "mask": mask},
                                {"latent_shape": list(shape), "pattern": self.pattern}))

    @staticmethod
    def key(secret: Secret) -> tuple[torch.Tensor, torch.Tensor]:
        key = torch.complex(secret.tensors["key_real"].double(), secret.tensors["key_imag"].double())
        return key, secret.tensors["mask"].bool()

    def generate(self, pipe, secret: Secret, request, ctx) -> torch.Tensor:
        key, mask = self.key(secret)
        z = initial_latents(pipe, request.seeds, request.height, request.width)
        if tuple(z.shape[1:]) != tuple(mask.shape):
            raise ValueError(f"tree_ring: the key was made for latents {tuple(mask.shape)}, the run samples "
                             f"{tuple(z.shape[1:])}")
        return ctx.generate(pipe, request, latents=inject(z, key, mask))

    def invert(self, images: torch.Tensor, ctx) -> torch.Tensor:
        steps = self.inversion_steps or getattr(ctx.data, "num_inference_steps", None) or 50
        return invert_images(ctx.data.verifier_pipeline(), images, steps, method=self.inversion,
                             fixed_point_iters=self.fixed_point_iters, decoder_steps=self.decoder_inversion_steps,
                             decoder_lr=self.decoder_inversion_lr, progress=ctx.progress)

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        key, mask = self.key(secret)
        z = self.invert(images, ctx)
        if tuple(z.shape[1:]) != tuple(mask.shape):  # e.g. a crop that changed the size: the key no longer fits
            raise ValueError(f"tree_ring: images of {images.shape[-2]}x{images.shape[-1]} px invert to latents "
                             f"{tuple(z.shape[1:])}, the key is {tuple(mask.shape)}")
        if self.score == "pvalue":
            scores = -torch.log10(p_values(z, key, mask).clamp_min(1e-300))
        else:
            scores = -l1_distance(z, key, mask)
        return Detection(scores=scores.float())
