"""Plugin base classes and the data types that flow between stages.

Plugins import only this public API (re-exported by :mod:`bench`), never the runner or the store.

Conventions shared by every plugin:

* ``version`` (str) is part of every cache key: bump it when the plugin's output changes.
* ``params`` declares the parameters (:class:`bench.Param`); the resolved values are in ``self.params`` and also
  available as attributes (``self.quality``).
* Images are ``float32`` tensors ``[N, 3, H, W]`` in ``[0, 1]`` on the CPU. Between stages the harness stores them as
  8-bit PNGs, so every stage sees exactly what a file on disk would hold.
* Randomness comes only from the ``torch.Generator`` the harness passes in (derived from the run seed and the
  stage's key): no global seeding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

from .params import Param, resolve_params

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ---------------------------------------------------------------------------------------------------------------
# Closed axes (Enums; public functions accept the string or the Enum)
# ---------------------------------------------------------------------------------------------------------------
class MarkLocation(str, enum.Enum):
    """Where a defence puts its mark."""

    NONE = "none"
    POST_HOC = "post_hoc"  # output pixels, after generation
    INITIAL_NOISE = "initial_noise"  # the sampler's starting latent (Tree-Ring, Gaussian Shading)
    MODEL_WEIGHTS = "model_weights"  # UNet / text encoder weights (SleeperMark, AquaLoRA, WDM)
    VAE_DECODER = "vae_decoder"  # latent decoder weights (Stable Signature)


class Verification(str, enum.Enum):
    """What the verifier needs: generated images only (black box) or the model's weights (white box)."""

    BLACK_BOX = "black_box"
    WHITE_BOX = "white_box"


class DetectionKind(str, enum.Enum):
    """Multi-bit defences return bits; zero-bit defences return a score (higher = more likely marked)."""

    BITS = "bits"
    SCORE = "score"


class NegativePolicy(str, enum.Enum):
    """Which images serve as negatives for a cell.

    ``attacked``: the unwatermarked base model's images under the same prompts, seeds, model attack and image
    attack (the fair comparison for FPR). ``clean``: the base model's images with no attack at all.
    """

    ATTACKED = "attacked"
    CLEAN = "clean"


# ---------------------------------------------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Secret:
    """What a defence keeps to verify: tensors (a key, a message, decoder weights) and JSON-able metadata.

    Stored as safetensors + JSON; must not hold anything else.
    """

    tensors: dict[str, "torch.Tensor"] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Embedding:
    """The output of :meth:`Defense.embed`: a (possibly) modified pipeline and the secret to verify with.

    ``pipeline=None`` means the pipeline is unchanged. The harness stores only the weights that differ from the
    base model.
    """

    secret: Secret
    pipeline: Any = None


@dataclass
class Detection:
    """What a verifier read from N images: ``bits`` (bool ``[N, k]``) or ``scores`` (float ``[N]``)."""

    bits: "torch.Tensor | None" = None
    scores: "torch.Tensor | None" = None


@dataclass(frozen=True)
class GenerationRequest:
    """Prompts and per-image seeds plus the sampler settings of the run."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    batch_size: int
    negative_prompt: str | None = None
    channels_last: bool = False  # run the UNet and VAE in channels-last memory format (bench.generation)
    compile: bool = False  # torch.compile the UNet before sampling


@dataclass(frozen=True)
class Measurement:
    """One number of a cell: value, 95% interval, sample size N, and a note (e.g. an unresolvable FPR)."""

    name: str
    value: float
    low: float | None = None
    high: float | None = None
    n: int = 0
    note: str = ""
    higher_is_better: bool | None = None


class StageContext:
    """What the harness hands a plugin: an explicit RNG, the device, progress reporting and helpers.

    ``generator`` is derived from (run seed, stage key). ``progress(iterable, total=..., description=...)`` wraps
    long loops in a progress bar nested under the run's. ``generate(pipe, request, latents=None)`` is the harness's
    standard text-to-image sampling (what every defence uses unless it changes the sampler).
    """

    def __init__(self, generator: "torch.Generator", device: str = "cpu", *,
                 progress: Callable[..., Iterable] | None = None,
                 generate: Callable[..., "torch.Tensor"] | None = None,
                 data: Any = None, stage: str = "", record: Callable[[str, Any], None] | None = None,
                 variant: str = ""):
        self.generator = generator
        self.device = device
        self._progress = progress
        self._generate = generate
        self.data = data
        self.stage = stage
        self.variant = variant
        self._record = record
        self.costs: dict[str, Any] = {}

    def progress(self, iterable: Iterable, total: int | None = None, description: str = "") -> Iterable:
        if self._progress is None:
            return iterable
        return self._progress(iterable, total=total, description=description)

    def generate(self, pipe: Any, request: GenerationRequest, **kwargs: Any) -> "torch.Tensor":
        if self._generate is None:
            from .generation import generate_images

            return generate_images(pipe, request, device=self.device, **kwargs)
        return self._generate(pipe, request, **kwargs)

    def record_cost(self, **costs: Any) -> None:
        """Record what a stage cost (steps, trainable parameters ...); stored with the cell's results."""
        self.costs.update(costs)


# ---------------------------------------------------------------------------------------------------------------
# Base classes
# ---------------------------------------------------------------------------------------------------------------
class Plugin:
    """Common behaviour: declared parameters, resolved at construction and recorded with every result."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    params: ClassVar[Sequence[Param]] = ()
    #: Parameters for the registry-wide smoke tests (e.g. a few training steps instead of thousands).
    smoke_params: ClassVar[Mapping[str, Any]] = {}
    #: What one of its stages needs on a cluster worker, over its stage kind's default (``bench.resources``):
    #: ``num_cpus``, ``num_gpus`` (asked for only when the run's device is a GPU), ``memory`` (bytes), or a
    #: custom Ray resource. A training model attack keeps the default (a GPU when the run has one); a cheap
    #: weight edit says ``{"num_gpus": 0}``. The config's ``[resources]`` table overrides both.
    resources: ClassVar[Mapping[str, float]] = {}

    def __init__(self, **given: Any):
        resolved = resolve_params(self.name or type(self).__name__, self.params, given)
        self.params = resolved  # type: ignore[misc]  # instance attribute shadows the declaration
        for k, v in resolved.items():
            setattr(self, k, v)

    @classmethod
    def declared(cls) -> Sequence[Param]:
        return cls.__dict__.get("params", None) or type.__getattribute__(cls, "params")

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def describe(self) -> str:
        """``name(k=v, ...)`` with the parameters that differ from the defaults."""
        defaults = {p.name: p.default for p in type(self).params}  # type: ignore[union-attr]
        changed = {k: v for k, v in self.params.items() if defaults.get(k) != v}
        if not changed:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_short(v)}" for k, v in sorted(changed.items())) + ")"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + "+".join(_short(x) for x in v) + "]"
    return str(v)


class Defense(Plugin):
    """A watermarking method: embeds a mark into a model (or its outputs) and verifies it.

    Subclasses set ``location``, ``verification`` and ``detection`` and implement :meth:`embed` and
    :meth:`detect`; in-model methods may also override :meth:`generate` (e.g. to add a trigger or keyed initial
    noise), post-hoc methods implement :meth:`mark` (the harness then marks the clean base images rather than
    generating them twice).
    """

    location: ClassVar[MarkLocation] = MarkLocation.NONE
    verification: ClassVar[Verification] = Verification.BLACK_BOX
    detection: ClassVar[DetectionKind] = DetectionKind.BITS
    #: Generation variants, each its own row of results (read as ``ctx.variant`` in :meth:`generate`). E.g.
    #: SleeperMark: ``("", "no_trigger")``: with the trigger (the mark) and without it (the sleeper must sleep).
    variants: ClassVar[tuple[str, ...]] = ("",)
    #: True if :meth:`embed` reads the run's prompts or image size (``ctx.data.prompts()``, ``ctx.data.height``,
    #: ``ctx.data.dataset``): they then become part of the embed stage's cache key.
    uses_data: ClassVar[bool] = False

    @classmethod
    def validate_class(cls, owner: str) -> None:
        from .errors import PluginValidationError

        for attr, enum_t in (("location", MarkLocation), ("verification", Verification),
                             ("detection", DetectionKind)):
            if not isinstance(getattr(cls, attr), enum_t):
                raise PluginValidationError(f"{owner}: class attribute '{attr}' must be a {enum_t.__name__}")
        if cls.location is MarkLocation.POST_HOC and cls.mark is Defense.mark:
            raise PluginValidationError(f"{owner}: a post-hoc defence must implement mark()")
        if cls.detect is Defense.detect:
            raise PluginValidationError(f"{owner} must implement detect()")
        if not cls.variants or not all(isinstance(v, str) for v in cls.variants) or \
                len(set(cls.variants)) != len(cls.variants):
            raise PluginValidationError(f"{owner}: 'variants' must be a tuple of distinct strings")
        if len(cls.variants) > 1 and cls.generate is Defense.generate:
            raise PluginValidationError(f"{owner}: generation variants need a generate() that reads ctx.variant")

    def embed(self, pipe: Any, ctx: StageContext) -> Embedding:
        """Return the watermarked pipeline (or None if unchanged) and the secret."""
        raise NotImplementedError

    def generate(self, pipe: Any, secret: Secret, request: GenerationRequest, ctx: StageContext) -> "torch.Tensor":
        """Generate marked images. Default: the harness's standard sampling with the (watermarked) pipeline."""
        return ctx.generate(pipe, request)

    def mark(self, images: "torch.Tensor", secret: Secret, ctx: StageContext) -> "torch.Tensor":
        """Post-hoc defences: mark already generated images."""
        raise NotImplementedError

    def detect(self, secret: Secret, images: "torch.Tensor", ctx: StageContext) -> Detection:
        raise NotImplementedError

    def message(self, secret: Secret) -> "torch.Tensor":
        """The embedded bits (bool ``[k]``) of a multi-bit defence; by default ``secret.tensors['message']``."""
        return secret.tensors["message"].bool()


class ImageAttack(Plugin):
    """An image-space attack: ``apply(images, generator) -> images``.

    Every image attack declares its natural parameter(s) plus an optional ``strength`` in [0, 1]; when
    ``strength`` is set, :meth:`from_strength` maps it to the natural parameter(s) (the mapping is documented in
    each attack's docstring; ranges follow WAVES where it has one). Strength 0 is the weakest setting.
    """

    #: True for the no-op attack: the planner then adds no stage (the unattacked column).
    identity: ClassVar[bool] = False

    def __init__(self, **given: Any):
        super().__init__(**given)
        s = self.params.get("strength")
        if s is not None:
            natural = resolve_params(self.name, type(self).params, self.from_strength(float(s)))
            natural = {k: natural[k] for k in self.from_strength(float(s))}
            self.params.update(natural)
            for k, v in natural.items():
                setattr(self, k, v)

    @classmethod
    def validate_class(cls, owner: str) -> None:
        from .errors import PluginValidationError

        names = {p.name for p in cls.params}
        if "strength" not in names:
            raise PluginValidationError(f"{owner} must declare an optional 'strength' parameter in [0, 1]")
        if cls.apply is ImageAttack.apply:
            raise PluginValidationError(f"{owner} must implement apply()")

    @classmethod
    def from_strength(cls, strength: float) -> dict[str, Any]:
        """Map a normalised strength in [0, 1] to the natural parameters."""
        raise NotImplementedError

    def apply(self, images: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
        raise NotImplementedError


class ModelAttack(Plugin):
    """A model-level attack: a pipeline in, a pipeline out. It may never use a defence's secret.

    ``uses_data`` says whether it reads ``ctx.data`` (a downstream dataset at the run's image size, the run's
    prompts): the run's prompts and image size then become part of its stage key. Record the cost with
    ``ctx.record_cost(steps=..., trainable_params=...)``; the harness adds the wall time.
    """

    uses_data: ClassVar[bool] = False
    #: True for the no-op attack: the planner then adds no stage.
    identity: ClassVar[bool] = False

    @classmethod
    def validate_class(cls, owner: str) -> None:
        from .errors import PluginValidationError

        if cls.apply is ModelAttack.apply:
            raise PluginValidationError(f"{owner} must implement apply()")

    def apply(self, pipe: Any, ctx: StageContext) -> Any:
        raise NotImplementedError


@dataclass
class MeasureContext:
    """Everything a metric may read for one cell. Image fields are loaded lazily by the harness.

    * ``detection`` / ``negatives``: what the verifier read from the cell's images and from the negatives.
    * ``message``: the embedded bits (multi-bit defences).
    * ``target_fprs``: the run's target false-positive rates.
    * ``images()``: the cell's final images (watermarked, model- and image-attacked).
    * ``unattacked_images()``: the same before the image attack.
    * ``clean_twins()``: the unwatermarked model's images for the same prompts and seeds (same model attack).
    * ``reference()``: the clean base model's images for the same prompts and seeds (no attack at all): the
      reference of FID and CLIP-score changes. ``reference_key`` identifies it, so a metric can keep reference
      statistics in ``shared`` (a dict that lives for the whole run) and compute them once per run.
    * ``prompts``: the prompt of each image; ``device``: where metrics may compute.
    """

    defense: Defense
    detection: Detection
    negatives: Detection
    message: "torch.Tensor | None"
    target_fprs: tuple[float, ...]
    generator: "torch.Generator"
    loaders: Mapping[str, Callable[[], "torch.Tensor"]] = field(default_factory=dict)
    prompts: tuple[str, ...] = ()
    reference_key: str = ""
    shared: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def images(self) -> "torch.Tensor":
        return self.loaders["images"]()

    def unattacked_images(self) -> "torch.Tensor":
        return self.loaders["unattacked"]()

    def clean_twins(self) -> "torch.Tensor":
        return self.loaders["clean_twins"]()

    def reference(self) -> "torch.Tensor":
        return self.loaders["reference"]()


class Metric(Plugin):
    """A metric of one cell: ``compute(ctx) -> [Measurement, ...]`` (torchmetrics-like ``higher_is_better``).

    ``needs_images`` tells the harness whether the metric reads images (so detection-only runs skip loading
    them).
    """

    higher_is_better: ClassVar[bool | None] = None
    needs_images: ClassVar[bool] = False

    @classmethod
    def validate_class(cls, owner: str) -> None:
        from .errors import PluginValidationError

        if cls.compute is Metric.compute:
            raise PluginValidationError(f"{owner} must implement compute()")

    def compute(self, ctx: MeasureContext) -> list[Measurement]:
        raise NotImplementedError
