"""UnMarker (Kassis & Hengartner, IEEE S&P 2025): a model-free spectral attack on defensive watermarks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from markbench import AttackContext, image_attacks, ImageAttack, param


def _dssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image ``1 - SSIM`` (Gaussian window 11, sigma 1.5, data range 1; torchmetrics), differentiable."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return 1.0 - structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")


def _mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x - y) ** 2).flatten(1).mean(1)


_DISTANCES = {"ssim": _dssim, "mse": _mse}


def spectral_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, the mean absolute difference of the 2-D DFT amplitude spectra (orthonormal FFT per channel):
    stage 1's loss, the paper's FFT loss with norm 1 and power 1."""
    return (torch.fft.fft2(x, norm="ortho").abs() - torch.fft.fft2(y, norm="ortho").abs()).abs().flatten(1).mean(1)


def low_frequency_distance(x: torch.Tensor, y: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per image, the mean squared difference of the ``kernel`` x ``kernel`` local means (stage 2's loss, the
    paper's mean loss): what a low-pass view of the two images tells apart."""
    pad = kernel // 2
    a = F.avg_pool2d(F.pad(x, (pad,) * 4, mode="reflect"), kernel, stride=1)
    b = F.avg_pool2d(F.pad(y, (pad,) * 4, mode="reflect"), kernel, stride=1)
    return ((a - b) ** 2).flatten(1).mean(1)


class _GuidedFilters(torch.nn.Module):
    """Stage 2's learnable filters: a chain of ``k`` x ``k`` filters, one learnable kernel per image and filter
    (initialised to the identity), each weighted per pixel by the colour similarity of the neighbour to the centre
    (``exp(-|x_q - x_p|^2 / (2 sigma_c^2))``, guided by the input image, as a joint bilateral filter) and
    normalised, applied one after another. Initialised with 80 % of each kernel's weight on its centre."""

    def __init__(self, n: int, sizes: tuple[int, ...], sigma_colour: float):
        super().__init__()
        self.sizes = sizes
        self.sigma_colour = sigma_colour
        self.logits = torch.nn.ParameterList()
        for k in sizes:
            w = torch.zeros(n, k * k)
            if k > 1:  # the centre carries 80 % of the spatial weight: a light colour-guided smoothing
                w[:, (k * k) // 2] = float(torch.log(torch.tensor(4.0 * (k * k - 1))))
            self.logits.append(torch.nn.Parameter(w))

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        for k, logits in zip(self.sizes, self.logits):
            pad = k // 2
            patches = F.unfold(F.pad(x, (pad,) * 4, mode="reflect"), k).view(n, c, k * k, h * w)
            g = F.unfold(F.pad(guide, (pad,) * 4, mode="reflect"), k).view(n, c, k * k, h * w)
            centre = guide.view(n, c, 1, h * w)
            colour = torch.exp(-((g - centre) ** 2).sum(1, keepdim=True) / (2 * self.sigma_colour ** 2))
            spatial = torch.softmax(logits, dim=1).view(n, 1, k * k, 1)
            weight = spatial * colour
            weight = weight / weight.sum(2, keepdim=True).clamp_min(1e-12)
            x = (patches * weight).sum(2).view(n, c, h, w)
        return x


@image_attacks.register("unmarker")
class UnMarker(ImageAttack):
    """UnMarker: two spectral optimisation stages under a perceptual constraint, with no model of the watermark.

    Kassis & Hengartner, IEEE S&P 2025, "UnMarker: A Universal Attack on Defensive Image Watermarking"
    (arXiv 2405.08363; official code andrekassis/ai-watermark, whose attack configs give the settings below).
    Watermarks must live in the image's spectrum to be robust; UnMarker disrupts the spectral amplitudes without
    knowing the scheme, in two stages:

    1. **High frequencies**: an additive RGB perturbation ``delta``, optimised with Adam (lr 2e-4 in the paper's
       configs), maximises the mean absolute difference of the DFT amplitude spectra (the paper's FFT loss, norm 1,
       power 1) subject to a perceptual distance below ``stage1_budget``; the constraint is a penalty
       ``c * max(0, d - budget)`` (c = 1e6, the paper's initial constant; one binary-search step, as in its configs)
       plus an L2 penalty on ``delta`` (factor 0.6). As a pixel-wise perturbation under a tight perceptual budget it
       reaches mostly the high frequencies.
    2. **Low frequencies**: a chain of learnable filters (kernels per image, colour-guided as a joint bilateral
       filter, sigma_colour 0.05; the paper's "learnable adaptive" modifier) maximises the distance of the images'
       local means (5 x 5, the paper's mean loss) subject to a perceptual distance below ``stage2_budget`` (Adam,
       lr 0.01 in the paper). Filtering moves content by whole structures, which an additive perturbation of the
       same perceptual cost cannot.

    Stage 1 starts from a uniform random perturbation of +-1/255 (``init``; from the stage's generator): the
    absolute spectral difference has no gradient at zero. Per image the result kept is the feasible one (distance within the budget) with the largest spectral loss
    (Carlini-Wagner style); an image for which no step is feasible is returned unchanged by that stage.

    **Deviations, and why.** The paper's perceptual losses (DeeplossVGG, LPIPS) need downloaded VGG weights, which
    are not available here: the constraint is ``constraint`` = ``"ssim"`` (``1 - SSIM``, the default) or ``"mse"``
    (per-pixel mean squared error), with budgets in those units (the paper's thresholds 1e-4 / 3e-3 are VGG-loss
    units and do not transfer). The paper's step counts (stage 1: 2000, stage 2: 500 iterations) are the defaults;
    its 0.9 centre-crop preprocessing is not part of this attack (compose with ``crop`` through ``combination``).
    Its filter sizes (up to 47 x 5 at 512 px) are scaled to small images: ``filter_sizes`` (odd sizes, default
    ``[5, 3]``).

    Strength mapping: ``stage1_budget = 0.002 + 0.018 s`` and ``stage2_budget = 0.005 + 0.045 s`` (1 - SSIM; for
    ``constraint = "mse"`` the same numbers divided by 10). Cost recorded: ``model_evals`` = 0 (model-free: no
    network is evaluated), ``steps`` = the two stages' optimisation steps per batch, ``attacker_images`` = 0.
    """

    version = "1"
    strength_mapping = "stage1_budget = 0.002 + 0.018 s, stage2_budget = 0.005 + 0.045 s (1 - SSIM; / 10 for mse)"
    zero_strength_tolerance = 0.02
    smoke_params = {"stage1_steps": 10, "stage2_steps": 4, "stage1_lr": 0.003}
    constraint: str = param("ssim", "perceptual distance the budgets bound: '1 - SSIM' or per-pixel MSE (the "
                            "paper's VGG losses need downloaded weights)", choices=("ssim", "mse"))
    stage1_budget: float = param(0.011, "stage 1 (high-frequency) perceptual budget", low=0.0, high=1.0)
    stage2_budget: float = param(0.0275, "stage 2 (low-frequency filter) perceptual budget", low=0.0, high=1.0)
    stage1_steps: int = param(2000, "stage 1 Adam iterations (the paper's configs: 2000)", low=0, high=100000)
    stage2_steps: int = param(500, "stage 2 Adam iterations (the paper's configs: 500)", low=0, high=100000)
    stage1_lr: float = param(2e-4, "stage 1 learning rate", low=0.0, high=1.0)
    stage2_lr: float = param(0.01, "stage 2 learning rate", low=0.0, high=10.0)
    penalty: float = param(1e6, "constant c of the constraint penalty c * max(0, d - budget)", low=0.0, high=1e12)
    stage1_l2: float = param(0.6, "stage 1 L2 penalty on the perturbation", low=0.0, high=100.0)
    mean_kernel: int = param(5, "stage 2: side of the local-mean window of the low-frequency loss", low=1, high=63)
    filter_sizes: list[int] = param([5, 3], "stage 2: the learnable filters' sizes (odd), applied in order")
    sigma_colour: float = param(0.05, "stage 2: colour sigma of the guided filters", low=1e-4, high=10.0)
    init: float = param(1.0 / 255, "stage 1: the random start's half-width (the spectral loss has no gradient at "
                        "zero)", low=0.0, high=1.0)
    batch_size: int = param(16, "images optimised at once", low=1, high=1024)

    @classmethod
    def from_strength(cls, s: float) -> dict[str, Any]:
        return {"stage1_budget": 0.002 + 0.018 * s, "stage2_budget": 0.005 + 0.045 * s}

    def _budgets(self) -> tuple[float, float]:
        scale = 1.0 if self.constraint == "ssim" else 0.1
        return self.stage1_budget * scale, self.stage2_budget * scale

    def apply(self, images: torch.Tensor, generator: torch.Generator, ctx: AttackContext | None = None
              ) -> torch.Tensor:
        for k in self.filter_sizes:
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                from markbench import PluginError

                raise PluginError(f"unmarker: filter_sizes must be odd positive integers, got {self.filter_sizes}")
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i:i + self.batch_size].to(torch.float32)
            out.append(self.stage2(self.stage1(x, generator), x))
        if ctx is not None:
            ctx.record_cost(model_evals=0, steps=int(self.stage1_steps + self.stage2_steps), attacker_images=0)
        return torch.cat(out).clamp(0.0, 1.0)

    def stage1(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """High-frequency stage: the feasible perturbed images with the largest amplitude-spectrum change. The
        perturbation starts at a uniform random point of +-``init`` (the spectral loss has no gradient at zero)."""
        dist = _DISTANCES[self.constraint]
        budget, _ = self._budgets()
        best, best_loss = x.clone(), torch.zeros(x.shape[0])
        if self.stage1_steps == 0 or budget <= 0:
            return best
        delta = ((torch.rand(x.shape, generator=generator) * 2 - 1) * self.init).requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=self.stage1_lr)
        with torch.enable_grad():
            for _ in range(self.stage1_steps):
                y = (x + delta).clamp(0, 1)
                spec = spectral_distance(y, x)
                d = dist(y, x)
                loss = (-spec + self.penalty * F.relu(d - budget)
                        + self.stage1_l2 * (delta ** 2).flatten(1).mean(1)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ok = (d <= budget) & (spec > best_loss)
                    best[ok] = y.detach()[ok]
                    best_loss[ok] = spec.detach()[ok]
        return best

    def stage2(self, x: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Low-frequency stage: the feasible filtered images (perceptual distance to ``original`` within the
        budget) with the largest change of the local means."""
        dist = _DISTANCES[self.constraint]
        _, budget = self._budgets()
        best, best_loss = x.clone(), torch.zeros(x.shape[0])
        if self.stage2_steps == 0 or budget <= 0:
            return best
        filters = _GuidedFilters(x.shape[0], tuple(self.filter_sizes), self.sigma_colour)
        opt = torch.optim.Adam(filters.parameters(), lr=self.stage2_lr)
        with torch.enable_grad():
            for _ in range(self.stage2_steps):
                y = filters(x, x).clamp(0, 1)
                low = low_frequency_distance(y, original, self.mean_kernel)
                d = dist(y, original)
                loss = (-low + self.penalty * F.relu(d - budget)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ok = (d <= budget) & (low > best_loss)
                    best[ok] = y.detach()[ok]
                    best_loss[ok] = low.detach()[ok]
        return best
