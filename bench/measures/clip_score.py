"""CLIP score: how well each image matches its prompt, by an open_clip model.

Per image ``100 * max(cos(E_img(image), E_txt(prompt)), 0)``: the CLIPScore of Hessel et al. (2021) with
torchmetrics' weight 100 (the paper uses 2.5), averaged over images. torchmetrics' ``CLIPScore`` clamps the
*average* cosine at 0 rather than each image's; the two agree whenever no image has a negative cosine with its
prompt, and the per-image form gives per-image values for an interval and for paired differences.

Model (``model``, ``pretrained``)
    A ``model`` name that a world answers to (:attr:`bench.world.World.clip_models`) is that world's recommended
    scorer: ``model="tiny-world"`` (default) is the tiny world's CLIP (:mod:`worlds.tiny.clip_model`), shipped in
    ``worlds/tiny/artifacts/tiny-clip/`` and built by ``bench zoo build``; ``pretrained`` may name another built
    folder (or its ``open_clip_model.safetensors``). Images are preprocessed as the tiny CLIP was trained
    (:func:`worlds.tiny.clip_model.preprocess`: [-1, 1], bilinear antialiased resize to 64x64).
    Any other ``model`` is an open_clip architecture name (``ViT-B-32``, ``ViT-L-14``; also ``hf-hub:...`` and
    ``local-dir:...``) with ``pretrained`` an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``: needs a
    download) or a local checkpoint file; images then go through open_clip's own evaluation transform for that
    model (8-bit PIL image, resize, centre crop, normalise) and prompts through its tokenizer.
    ``pretrained="random"`` gives randomly initialised weights (seed 0): only for tests; the score means nothing.

Measurements (``n`` = number of images; 95% Student-t intervals over images)
    ``clip_score``: the cell's final images (``ctx.images()``: marked, model- and image-attacked).
    ``clip_score_watermark``: ``ctx.unattacked_images()`` (marked, before the image attack).
    ``clip_score_delta``: mean of the paired per-image differences final - reference, where the reference is
    ``ctx.reference()``, the clean base model's image for the same prompt and seed: the combined change in text
    alignment due to mark and attacks (negative = worse). ``clip_score_watermark_delta``: unattacked - reference,
    the mark's own cost (plus the model attack's, in model-attack cells). ``clip_score_twin``: the right twin's
    images (``ctx.twins()``: the equally attacked clean model's images made the same way, e.g. given a trigger
    defence's trigger), scored against the captions; ``clip_score_twin_delta``: unattacked - twin, paired (left
    out when ``ctx.paired_twin`` is False): the mark's own cost, neither the trigger's nor the model attack's.

Scores of an image set are computed once per run: they are kept in ``ctx.shared`` keyed by the model, the prompts
and a SHA-256 of the image tensor; the reference's also by ``ctx.reference_key``. The images' embeddings are also
stored in the artifact cache (``ctx.features``, :mod:`bench.measures.features`), keyed by the scorer's identity (model
name, a SHA-256 of its weights, its preprocessing, ``batch_size``, device type, torch version) and the set's pixels,
so a new output folder on the same cache, or ``attacker_utility``'s CLIP change, does not run the image tower again;
the scores are then the same bit for bit (the prompts' embeddings are recomputed: the text tower is cheap).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

from markbench import param, stats
from markbench.errors import ConfigError
from markbench.measures.features import cached_features, extractor_identity
from markbench.plugins import MeasureContext, Measurement, Metric
from markbench.registries import metrics

#: the default scorer's name. No special case: like any ``model`` it is looked up among the names the registered
#: worlds answer to (:attr:`bench.world.World.clip_models`); the tiny world registers it for its shipped CLIP
DEFAULT_CLIP_MODEL = "tiny-world"
RANDOM = "random"
WEIGHT = 100.0
_SHARED = "markbench.measures.clip_score"
_MODELS: dict[tuple, "ClipScorer"] = {}


class ClipScorer:
    """An open_clip model with its image preprocessing and tokenizer: per-image CLIP scores."""

    def __init__(self, model: Any, preprocess_images, tokenizer, device: str, batch_size: int,
                 preprocess_id: str | None = None):
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess_images = preprocess_images  # float [N, 3, H, W] in [0, 1] -> model input
        #: names the preprocessing in the feature cache's key (default: the function's qualified name)
        self.preprocess_id = preprocess_id or (f"{getattr(preprocess_images, '__module__', '')}."
                                               f"{getattr(preprocess_images, '__qualname__', repr(preprocess_images))}")
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        out = [self.model.encode_text(self.tokenizer(prompts[i:i + self.batch_size]).to(self.device))
               for i in range(0, len(prompts), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out).double().cpu(), dim=-1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = self.preprocess_images(images[i:i + self.batch_size].float().clamp(0, 1)).to(self.device)
            out.append(self.model.encode_image(x).double().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def scores(self, images: torch.Tensor, prompts: tuple[str, ...]) -> np.ndarray:
        """``100 * max(cos, 0)`` per image (float64 ``[N]``; embeddings L2-normalised here, in float64)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"CLIP score: {images.shape[0]} images but {len(prompts)} prompts")
        return self.scores_from_features(self.image_features(images), prompts)

    def scores_from_features(self, image_features: torch.Tensor, prompts: tuple[str, ...]) -> np.ndarray:
        """:meth:`scores` from the images' (stored) :meth:`image_features`: the same arithmetic, the same bits."""
        if len(prompts) != image_features.shape[0]:
            raise ValueError(f"CLIP score: {image_features.shape[0]} images but {len(prompts)} prompts")
        unique = sorted(set(prompts))
        text = self.text_features(unique)
        rows = torch.tensor([unique.index(p) for p in prompts])
        cos = (image_features * text[rows]).sum(dim=-1)
        return (WEIGHT * cos.clamp(min=0)).numpy()


def open_clip_scorer(name: str, pretrained: str | None, device: str, batch_size: int) -> ClipScorer:
    import open_clip
    from PIL import Image

    from markbench.world import all_worlds

    for w in all_worlds():  # a world may add open_clip architectures of its own (the tiny world's TinyWorld-RN)
        w.register_open_clip()
    if pretrained == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, transform = open_clip.create_model_and_transforms(name, pretrained=None)
    else:
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        arrays = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.stack([transform(Image.fromarray(a)) for a in arrays])

    return ClipScorer(model, preprocess, open_clip.get_tokenizer(name), device, batch_size,
                      preprocess_id=f"open_clip {name}: 8-bit PIL, {' '.join(repr(transform).split())}")


def scorer(model: str = DEFAULT_CLIP_MODEL, pretrained: str | None = None, device: str = "cpu",
           batch_size: int = 64) -> ClipScorer:
    """The CLIP scorer for ``model`` / ``pretrained`` (loaded once per process and device)."""
    key = (model, pretrained, str(device))
    if key not in _MODELS:
        from markbench.world import world_for_clip_model

        world = world_for_clip_model(model)
        if world is not None:  # a world's recommended scorer (model = "tiny-world": the shipped tiny CLIP)
            _MODELS[key] = world.clip_scorer(model, pretrained, device, batch_size)
        else:
            _MODELS[key] = open_clip_scorer(model, pretrained, device, batch_size)
    s = _MODELS[key]
    s.batch_size = batch_size
    return s


def _digest(images: torch.Tensor, prompts: tuple[str, ...]) -> str:
    t = images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.numpy().tobytes())
    h.update("\x00".join(prompts).encode())
    return h.hexdigest()


@metrics.register("clip_score")
class CLIPScore(Metric):
    """CLIP score ``100 * max(cos, 0)`` of each image with its prompt (tiny-world CLIP by default), and its change.

    ``clip_score`` (final images), ``clip_score_watermark`` (before the image attack), ``clip_score_delta`` and
    ``clip_score_watermark_delta`` (paired differences against the clean base model's images for the same prompts
    and seeds); mean over images with a 95% t-interval. Details in :mod:`bench.measures.clip_score`.
    """

    version = "2"
    needs_images = True
    higher_is_better = True
    model: str = param(DEFAULT_CLIP_MODEL, "'tiny-world' (the shipped tiny CLIP) or an open_clip architecture (ViT-B-32, "
            "hf-hub:..., local-dir:...)")
    pretrained: str | None = param(None, "weights: an open_clip pretrained tag (e.g. 'openai'; downloads) or a local "
            "file; for 'tiny-world' a built folder (default: the shipped one); 'random': random weights, for tests")
    batch_size: int = param(64, "images (and prompts) per forward pass", low=1)
    #: the registry-wide smoke test must not depend on the tiny CLIP having been built
    smoke_params = {"pretrained": RANDOM}

    def __init__(self, **given: Any):
        super().__init__(**given)
        model, pretrained = self.params["model"], self.params["pretrained"]
        from markbench.world import world_for_clip_model

        if (world_for_clip_model(model) is None and pretrained is None
                and not model.startswith(("hf-hub:", "local-dir:"))):
            raise ConfigError(f"metric 'clip_score': model={model!r} needs pretrained=<an open_clip pretrained tag "
                              f"or a weights file> (or 'random' for a test)")

    def _scorer(self, ctx: MeasureContext) -> ClipScorer:
        return scorer(self.params["model"], self.params["pretrained"], ctx.device, self.params["batch_size"])

    def _model_id(self) -> tuple:
        return (self.params["model"], self.params["pretrained"])

    def scores(self, images: torch.Tensor, ctx: MeasureContext) -> np.ndarray:
        """Per-image scores of an image set with ``ctx.prompts`` (computed at most once per run; the images'
        embeddings at most once per feature cache, :mod:`bench.measures.features`)."""
        cache = ctx.shared.setdefault(_SHARED, {})
        prompts = tuple(ctx.prompts)
        key = (self._model_id(), _digest(images, prompts))
        if key not in cache:
            if len(prompts) != images.shape[0]:
                raise ValueError(f"CLIP score: {images.shape[0]} images but {len(prompts)} prompts")
            s = self._scorer(ctx)
            feats = cached_features(ctx, lambda: self._identity(s, ctx), images, s.image_features,
                                    what="CLIP image embeddings (L2-normalised, float64)")
            cache[key] = s.scores_from_features(feats, prompts)
        return cache[key]

    def _identity(self, s: ClipScorer, ctx: MeasureContext) -> dict[str, Any]:
        return extractor_identity(f"clip:{self.params['model']}", s.model, s.preprocess_id,
                                  self.params["batch_size"], ctx.device)

    def reference_scores(self, ctx: MeasureContext) -> np.ndarray:
        cache = ctx.shared.setdefault(_SHARED, {})
        key = (self._model_id(), "reference", ctx.reference_key)
        if ctx.reference_key and key in cache:
            return cache[key]
        s = self.scores(ctx.reference(), ctx)
        if ctx.reference_key:
            cache[key] = s
        return s

    def _measure(self, name: str, values: np.ndarray, what: str) -> Measurement:
        est = stats.mean_t_interval(values)
        clean = lambda x: x if math.isfinite(x) else None  # noqa: E731
        label = self.params["model"] + (f" ({self.params['pretrained']})" if self.params["pretrained"] else "")
        note = (f"mean over {values.size} images of {what}; CLIP score = 100 * max(cos(image, prompt), 0) per "
                f"image (CLIPScore with torchmetrics' weight 100), model {label}; 95% t-interval")
        return Measurement(name=name, value=est.value, low=clean(est.low), high=clean(est.high), n=est.n,
                           note=note, higher_is_better=True, samples=tuple(float(v) for v in values))

    @classmethod
    def outputs(cls, params, target_fprs):
        return ("clip_score", "clip_score_watermark", "clip_score_delta", "clip_score_watermark_delta")

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        if not ctx.prompts:
            raise ValueError("metric 'clip_score' needs the prompt of each image (ctx.prompts is empty)")
        final = self.scores(ctx.images(), ctx)
        unattacked = self.scores(ctx.unattacked_images(), ctx)
        if final.size == 0:
            return []
        out = [self._measure("clip_score", final, "the final (marked, attacked) images"),
               self._measure("clip_score_watermark", unattacked, "the marked images before the image attack")]
        if "reference" in ctx.loaders:
            ref = self.reference_scores(ctx)
            if ref.shape != final.shape:
                raise ValueError(f"clip_score: {final.size} images but {ref.size} reference images")
            out.append(self._measure("clip_score_delta", final - ref,
                                     "final minus the clean base model's image (same prompt and seed)"))
            out.append(self._measure("clip_score_watermark_delta", unattacked - ref,
                                     "unattacked minus the clean base model's image (same prompt and seed)"))
        twins = self.scores(ctx.twins(), ctx)
        if twins.shape != unattacked.shape:
            raise ValueError(f"clip_score: {unattacked.size} images but {twins.size} twin images")
        out.append(self._measure("clip_score_twin", twins, "the right twin (the equally attacked clean model's "
                                 "images made the same way, e.g. given the trigger)"))
        if ctx.paired_twin:
            out.append(self._measure("clip_score_twin_delta", unattacked - twins,
                                     "unattacked minus its right twin (same prompt, seed and procedure on the "
                                     "clean weights): the mark's own cost in text alignment"))
        return out
