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
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

from .errors import PluginValidationError
from .params import Declared, Param, params_from_attributes, resolve_params, validate_declarations

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


class ThreatSetting(str, enum.Enum):
    """The deployment a defence claims to protect (its threat model).

    ``api``: the model is served behind an API; the provider controls sampling and the attacker sees only images
    (Tree-Ring, Gaussian Shading, post-hoc marks): attacks on the model itself are outside this setting.
    ``weights``: the weights are released; the mark must live in them and survive their holder (SleeperMark,
    AquaLoRA, WDM, Stable Signature's decoder): model attacks are in scope. ``both``: claims both.
    """

    API = "api"
    WEIGHTS = "weights"
    BOTH = "both"

    def covers_model_attacks(self) -> bool:
        return self is not ThreatSetting.API


class ThreatTier(str, enum.Enum):
    """What a model attack knows of the defence it attacks (its threat tier; shown by ``bench ls -v``, stored per cell
    and shown in the matrix and the report).

    ``blind``: nothing: the released weights (and public data) only; the attack is the same whatever the defence.
    ``method_known``: which method is used and how it works (e.g. which layers SleeperMark trains), not its secrets.
    ``trigger_known``: also the defence's trigger (:meth:`Defense.known_trigger`: SleeperMark's trigger prompt, WDM's
    trigger latent), never its key, message or decoder. Only this tier's attacks receive anything of the secret
    (``ctx.knowledge``, :class:`DefenseKnowledge`); the others get a sealed view that refuses every read.
    """

    BLIND = "blind"
    METHOD_KNOWN = "method_known"
    TRIGGER_KNOWN = "trigger_known"

    def sees_trigger(self) -> bool:
        return self is ThreatTier.TRIGGER_KNOWN


@dataclass(frozen=True)
class Trigger:
    """A defence's trigger as an attacker who knows it has it (:meth:`Defense.known_trigger`).

    ``prompt_prefix`` / ``prompt_suffix``: text put before / after the prompt (separated by a space) to wake the mark
    (SleeperMark: the paper's prefix, or the tiny world's content-neutral suffix). ``latent`` and ``mix``: an input
    shift of the UNet, which sees ``mix * z_t + (1 - mix) * latent`` on the watermark's process (WDM's trigger and
    gamma1), conditioned on ``prompt`` (WDM: the empty prompt).
    """

    prompt_prefix: str = ""
    latent: "torch.Tensor | None" = None
    mix: float = 1.0
    prompt: str = ""
    prompt_suffix: str = ""

    @property
    def in_prompt(self) -> bool:
        """The trigger is text in the prompt."""
        return bool(self.prompt_prefix or self.prompt_suffix)

    def apply(self, prompt: str) -> str:
        """``prompt`` with the trigger text where the defence puts it."""
        return self.prompt_prefix + prompt + (f" {self.prompt_suffix}" if self.prompt_suffix else "")


class SecretAccessError(PermissionError):
    """A model attack read a defence's secret its threat tier does not allow."""


class DefenseKnowledge:
    """What a model attack knows of the defence whose model it attacks (``ctx.knowledge``), by its tier.

    ``method``: the defence's registered name (``method_known`` and ``trigger_known``; None for ``blind`` and for
    the clean base model's branch of a method-known attack, which attacks the base the same way). ``trigger()``: the
    :class:`Trigger` (``trigger_known`` only; None when the defence has none); every other tier's view raises
    :class:`SecretAccessError`, as does any attempt to reach the secret itself.
    """

    __slots__ = ("_tier", "_method", "_trigger")

    def __init__(self, tier: "ThreatTier | str" = ThreatTier.BLIND, method: str | None = None,
                 trigger: Trigger | None = None):
        tier = ThreatTier(tier)
        object.__setattr__(self, "_tier", tier)
        object.__setattr__(self, "_method", method if tier is not ThreatTier.BLIND else None)
        object.__setattr__(self, "_trigger", trigger if tier.sees_trigger() else None)

    def __setattr__(self, name: str, value: Any) -> None:
        raise SecretAccessError("a defence's knowledge is read-only")

    @property
    def tier(self) -> ThreatTier:
        return self._tier

    @property
    def method(self) -> str | None:
        return self._method

    def trigger(self) -> Trigger | None:
        if not self._tier.sees_trigger():
            raise SecretAccessError(f"a model attack of tier '{self._tier.value}' has no access to the defence's "
                                    f"trigger (only '{ThreatTier.TRIGGER_KNOWN.value}' attacks have)")
        return self._trigger

    def secret(self) -> None:
        raise SecretAccessError("no model attack has access to a defence's secret (key, message, decoder)")

    def __repr__(self) -> str:
        return f"DefenseKnowledge(tier={self._tier.value!r}, method={self._method!r})"


def threat_scope(defense_cls: type, model_attack_cls: type) -> dict[str, Any]:
    """The defence's threat setting and whether a cell with this model attack lies outside it (stored per cell).

    Image attacks are in every setting (anyone who sees an image can edit it); a model attack needs the weights, so
    it is outside the setting of a defence that protects only API-served models.
    """
    setting = ThreatSetting(getattr(defense_cls, "threat", ThreatSetting.API))
    attacked = not getattr(model_attack_cls, "identity", False)
    service = attacked and getattr(model_attack_cls, "serves_prompts", False)  # the service, not the weights
    on_weights = attacked and not service
    outside = on_weights and not setting.covers_model_attacks()
    note = (f"outside the defence's threat model: it protects API-served models ({setting.value}), this model "
            f"attack needs the released weights") if outside else ""
    tier = ThreatTier(getattr(model_attack_cls, "tier", ThreatTier.BLIND)).value if attacked else ""
    needs = "weights" if on_weights else "service" if service else "none"
    return {"defense": setting.value, "model_attack_needs": needs,
            "outside": outside, "note": note, **({"tier": tier} if tier else {})}


class QualityMeasure(str, enum.Enum):
    """Which quality comparisons mean something for a defence.

    ``paired``: PSNR / SSIM of each marked image against its clean twin (same prompt, same initial noise): only
    meaningful when the mark keeps the sampler's noise. ``distribution``: FID / KID / CLIP score against the clean
    model, the measures for marks that change the initial noise (a clean twin with other noise is another image).
    """

    PAIRED = "paired"
    DISTRIBUTION = "distribution"


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
    #: sample in batches of exactly ``batch_size``, padding the last one (``run.batch_across_cells``)
    pad_to_batch: bool = False


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
    #: The per-image values whose mean is ``value`` (a rate's 0/1 outcomes), where the metric has them: stored, so
    #: that several seeds (embeddings, attack runs) can be combined by a hierarchical bootstrap
    #: (:func:`bench.stats.hierarchical_bootstrap`) rather than by pooling images.
    samples: tuple[float, ...] | None = field(default=None, repr=False)
    #: For a two-sample statistic (ROC AUC): the negatives' per-image values, ``samples`` holding the positives'
    #: (each image's placement among the other sample: :class:`bench.stats.Placements`), so that several seeds
    #: combine by a bootstrap that resamples both (:func:`bench.stats.hierarchical_auc`).
    samples_neg: tuple[float, ...] | None = field(default=None, repr=False)


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
                 variant: str = "", knowledge: "DefenseKnowledge | None" = None):
        self.generator = generator
        #: what a model attack knows of the defence (its tier's view; a blind, sealed one unless the harness says)
        self.knowledge = knowledge if knowledge is not None else DefenseKnowledge()
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = {k: v for k, v in cls.__dict__.items() if isinstance(v, Declared)}
        if not declared:
            return
        if "params" in cls.__dict__:
            raise PluginValidationError(f"{cls.__qualname__}: parameters are declared twice, in 'params' and as "
                                        f"typed attributes ({', '.join(declared)}); keep the typed attributes")
        cls.params = params_from_attributes(cls.__qualname__, declared, inspect.get_annotations(cls),
                                            tuple(getattr(cls, "params", ())))
        validate_declarations(cls.__qualname__, cls.params)  # a bad declaration fails where it is written
        for name in declared:  # the instance holds the value (Plugin.__init__); the class keeps only the annotation
            delattr(cls, name)

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

    def named_models(self) -> dict[str, tuple[str, str]]:
        """The models this configured plugin loads besides the run's base model, by parameter: ``{param: (kind,
        value)}`` for every parameter declared with ``names_model`` whose value is not ``"base"`` or ``""``. The
        planner keys the plugin's stages by those weights' fingerprints (:func:`bench.models.named_model_identity`):
        an attack's stage, a defence's embedding. A plugin whose parameters name a model only in some settings
        overrides this."""
        return {p.name: (p.names_model, self.params[p.name]) for p in type(self).params  # type: ignore[union-attr]
                if p.names_model and self.params[p.name] not in ("base", "")}

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
    #: The deployment the defence protects: model attacks on an ``API``-only defence are outside its threat model
    #: (the matrix and the report mark those cells).
    threat: ClassVar[ThreatSetting] = ThreatSetting.API
    #: The quality comparisons that apply to its images. ``PAIRED``: the marked image has a *paired* clean twin, the
    #: clean model's image made the same way (same prompt, seed and generation procedure, e.g. SleeperMark's trigger
    #: prompt on the clean weights), so per-image PSNR/SSIM to it is the mark's cost. ``DISTRIBUTION``: FID / CLIP
    #: score against the clean model. ``None`` (default): decided by ``location``: a mark that *is* the initial noise
    #: (Tree-Ring, Gaussian Shading) has no paired twin (its clean counterpart draws other noise), every other has
    #: both. The one declaration of this fact: :meth:`has_paired_twin` and the metrics read it.
    quality_measures: ClassVar[tuple[QualityMeasure, ...] | None] = None
    #: True if the defence's trigger is text in the prompt (:meth:`known_trigger` returns a prompt prefix or suffix and
    #: :meth:`generate` is the standard sampler given the trigger text): the ``trigger_specificity`` metric then puts
    #: random strings of the trigger's token length in its place (:mod:`bench.triggers`).
    prompt_trigger: ClassVar[bool] = False
    #: True if :meth:`embed` reads the run's prompts or image size (``ctx.data.prompts()``, ``ctx.data.height``,
    #: ``ctx.data.dataset``): they then become part of the embed stage's cache key.
    uses_data: ClassVar[bool] = False

    @classmethod
    def measures(cls) -> tuple[QualityMeasure, ...]:
        """The quality comparisons that apply (:attr:`quality_measures`, or the location's default)."""
        if cls.quality_measures is not None:
            return tuple(cls.quality_measures)
        if cls.location is MarkLocation.INITIAL_NOISE:
            return (QualityMeasure.DISTRIBUTION,)
        return (QualityMeasure.PAIRED, QualityMeasure.DISTRIBUTION)

    @classmethod
    def has_paired_twin(cls) -> bool:
        """Whether a marked image has a pixel-aligned clean twin (``QualityMeasure.PAIRED`` applies)."""
        return QualityMeasure.PAIRED in cls.measures()

    @classmethod
    def validate_class(cls, owner: str) -> None:
        from .errors import PluginValidationError

        for attr, enum_t in (("location", MarkLocation), ("verification", Verification),
                             ("detection", DetectionKind), ("threat", ThreatSetting)):
            if not isinstance(getattr(cls, attr), enum_t):
                raise PluginValidationError(f"{owner}: class attribute '{attr}' must be a {enum_t.__name__}")
        if cls.location is MarkLocation.POST_HOC and cls.mark is Defense.mark:
            raise PluginValidationError(f"{owner}: a post-hoc defence must implement mark()")
        if cls.detect is Defense.detect:
            raise PluginValidationError(f"{owner} must implement detect()")
        if not cls.variants or not all(isinstance(v, str) for v in cls.variants) or \
                len(set(cls.variants)) != len(cls.variants):
            raise PluginValidationError(f"{owner}: 'variants' must be a tuple of distinct strings")
        if cls.quality_measures is not None and (
                not cls.quality_measures or not all(isinstance(q, QualityMeasure) for q in cls.quality_measures)):
            raise PluginValidationError(f"{owner}: 'quality_measures' must be None or a non-empty tuple of "
                                        "QualityMeasure")
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

    def known_trigger(self, secret: Secret) -> Trigger | None:
        """The trigger that wakes the mark, as a ``trigger_known`` attacker knows it (None: the defence has none).
        The only part of a secret the harness ever hands a model attack (:class:`DefenseKnowledge`)."""
        return None


@dataclass
class AttackContext:
    """What an image attack that declares ``needs_model`` receives as ``apply(images, generator, ctx=...)``.

    * ``model``: the pipeline the attack asked for. ``needs_model = "base"``: the run's clean base pipeline, loaded
      once per process and shared (read-only: build new pipelines from its components, never change its weights);
      what an attacker of released weights has.
    * ``model_fingerprint``: identifies that model; it is part of the attack stage's cache key.
    * ``device``: where the attack may compute. ``progress(iterable, total=..., description=...)``: a progress bar.
    * ``record_cost(**costs)``: the attack's cost (model evaluations, images it needed), stored with the cell.

    An attack without ``needs_model`` gets a context (without a model) when its ``apply`` takes ``ctx``.
    """

    model: Any = None
    model_fingerprint: str = ""
    device: str = "cpu"
    progress: Callable[..., Iterable] | None = None
    #: what the attack reports of its cost (``record_cost``): stored with the stage and the cell
    costs: dict[str, Any] = field(default_factory=dict)
    #: the tensors of the attack's trained surrogate (``trains_surrogate``), None for other attacks
    surrogate: "dict[str, torch.Tensor] | None" = None

    def record_cost(self, **costs: Any) -> None:
        """Report the attack's cost, e.g. ``model_evals=`` (forward or backward passes of a network) and
        ``attacker_images=`` (images the attacker needed besides the one it attacks); the harness adds the seconds
        and the number of images attacked."""
        self.costs.update(costs)

    def track(self, iterable: Iterable, total: int | None = None, description: str = "") -> Iterable:
        return iterable if self.progress is None else self.progress(iterable, total=total, description=description)


#: What ``ImageAttack.needs_model`` may name: ``"base"``, the run's clean base pipeline.
ATTACK_MODELS = ("base",)


def apply_image_attack(attack: "ImageAttack", images: "torch.Tensor", generator: "torch.Generator",
                       ctx: AttackContext | None = None) -> "torch.Tensor":
    """Call ``attack.apply`` as the harness does: ``apply(images, generator)``, plus ``ctx=`` for an attack that
    declares ``needs_model`` or whose ``apply`` takes ``ctx`` (the classic two-argument ``apply`` of every other
    attack is unchanged)."""
    _check_model(attack, ctx)
    if _takes_ctx(type(attack).apply):
        return attack.apply(images, generator, ctx=ctx if ctx is not None else AttackContext())
    return attack.apply(images, generator)


def forge_images(attack: "ImageAttack", clean: "torch.Tensor", marked: "torch.Tensor", generator: "torch.Generator",
                 ctx: AttackContext | None = None) -> "torch.Tensor":
    """Call ``attack.forge`` as the harness does for a forgery (``attack.forges`` True): the clean images to forge
    and the marked images the attacker learns the mark from."""
    _check_model(attack, ctx)
    return attack.forge(clean, marked, generator, ctx=ctx if ctx is not None else AttackContext())


def _check_model(attack: "ImageAttack", ctx: AttackContext | None) -> None:
    if type(attack).needs_model and (ctx is None or ctx.model is None):
        from .errors import PluginError

        raise PluginError(f"image attack '{attack.name}' needs the {type(attack).needs_model} model, "
                          f"but none was given")


def _takes_ctx(fn: Callable) -> bool:
    return "ctx" in inspect.signature(fn).parameters


class ImageAttack(Plugin):
    """An image-space attack: ``apply(images, generator) -> images``.

    An attack that needs a generative model (regeneration, an encoder to attack) declares it with the class
    attribute ``needs_model`` (``"base"``: the run's clean base pipeline) and takes a keyword argument ``ctx``:
    ``apply(images, generator, ctx)``, where ``ctx`` is an :class:`AttackContext` whose ``model`` is that pipeline.
    The model's fingerprint is then part of the attack stage's cache key. Attacks that declare nothing keep the
    two-argument ``apply``.

    A subclass declares only its natural parameter(s) and :meth:`from_strength`. The base class adds the optional
    normalised ``strength`` in [0, 1] to ``params`` (documented by ``strength_mapping``, e.g.
    ``"quality = round(90 - 80 s)"``); when a config sets it, the base clamps it to [0, 1] and resolves the
    natural parameters through :meth:`from_strength` (ranges follow WAVES where it has one). Strength 0 is the
    weakest setting.

    Class attributes that describe the attack to the contract tests (:mod:`bench.testing`):
    ``deterministic`` (the output does not depend on the generator, so a batch equals its images one by one),
    ``zero_strength_tolerance`` (the mean absolute change allowed at strength 0) and ``strength_effect`` (how the
    growing effect of strength is measured: ``"mad"``, mean absolute difference, ``"psnr"``, loss of PSNR, or
    ``"fixed_mark"``, how close the attack brings a batch carrying one fixed additive pattern back to the unmarked
    images (mean squared error): for estimation attacks whose strength is the number of images they learn from).

    Forgery (spoofing): an attack whose :attr:`forges` is True (a property of its parameters, e.g. ``mode =
    "forge"``) is a *forgery*: the planner hands it clean images (the clean model's) and the marked images the
    attacker has, ``forge(clean, marked, generator, ctx) -> images``, and its cell measures the false-positive rate
    of the forged images at the defence's threshold (metric ``forgery``) instead of removal. An attack that can
    forge declares ``can_forge = True`` and implements :meth:`forge`.
    """

    #: The attack implements :meth:`forge` (some of its parameter settings are forgeries).
    can_forge: ClassVar[bool] = False
    #: Parameters that make it a forgery (e.g. ``{"mode": "forge"}``), for the contract tests.
    forge_params: ClassVar[dict[str, Any]] = {}
    #: The attack trains a surrogate detector first (a cached ``surrogate`` stage): it declares the parameter
    #: ``train_images`` (images per class the attacker generates) and implements :meth:`train_surrogate`; its
    #: ``apply`` / ``forge`` then find the trained tensors in ``ctx.surrogate``.
    trains_surrogate: ClassVar[bool] = False
    #: The parameters the surrogate's training reads (besides ``train_images``): only they key its stage, so one
    #: surrogate serves every setting of the others (a removal and a forgery, every budget).
    surrogate_params: ClassVar[tuple[str, ...]] = ()

    #: True for the no-op attack: the planner then adds no stage (the unattacked column).
    identity: ClassVar[bool] = False
    #: The model the attack needs (see :data:`ATTACK_MODELS`), handed to ``apply`` as ``ctx.model``; None: none.
    needs_model: ClassVar[str | None] = None
    #: What ``strength`` sets, in words shown by ``bench ls`` (e.g. ``"quality = round(90 - 80 s)"``).
    strength_mapping: ClassVar[str] = ""
    #: The output does not depend on the generator.
    deterministic: ClassVar[bool] = False
    #: Mean absolute difference allowed between input and output at strength 0 (near-identity).
    zero_strength_tolerance: ClassVar[float] = 1e-6
    #: How the contract tests measure the effect of strength: ``"mad"``, ``"psnr"`` (a codec's loss) or
    #: ``"fixed_mark"`` (a batch with one fixed additive pattern brought back toward the unmarked images).
    strength_effect: ClassVar[str] = "mad"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = cls.complete_params(tuple(cls.params), cls.strength_mapping)

    @staticmethod
    def complete_params(params: tuple[Param, ...], mapping: str = "") -> tuple[Param, ...]:
        """``params`` with the normalised ``strength`` appended (unless the attack declares it itself)."""
        if any(p.name == "strength" for p in params):
            return params
        doc = f"normalised strength; sets {mapping}" if mapping else "normalised strength"
        return params + (Param("strength", "float", None, doc, low=0.0, high=1.0, optional=True),)

    @classmethod
    def natural_params(cls, strength: float) -> dict[str, Any]:
        """The natural parameters that ``strength`` sets: :meth:`from_strength` of the strength clamped to [0, 1]."""
        return dict(cls.from_strength(min(max(float(strength), 0.0), 1.0)))

    def __init__(self, **given: Any):
        super().__init__(**given)
        s = self.params.get("strength")
        if s is not None:
            mapped = self.natural_params(s)
            natural = resolve_params(self.name, type(self).params, mapped)
            natural = {k: natural[k] for k in mapped}
            self.params.update(natural)
            for k, v in natural.items():
                setattr(self, k, v)

    @classmethod
    def validate_class(cls, owner: str) -> None:
        from .errors import ConfigError, PluginValidationError

        by_name = {p.name: p for p in cls.params}
        strength = by_name.get("strength")
        if strength is None or strength.type != "float" or not strength.optional or \
                (strength.low, strength.high) != (0.0, 1.0):
            raise PluginValidationError(f"{owner}: 'strength' must be an optional float in [0, 1]")
        if cls.apply is ImageAttack.apply:
            raise PluginValidationError(f"{owner} must implement apply()")
        if getattr(cls.from_strength, "__func__", None) is ImageAttack.from_strength.__func__:  # type: ignore[attr-defined]
            raise PluginValidationError(f"{owner} must implement from_strength(s) (its strength mapping)")
        if cls.strength_effect not in ("mad", "psnr", "fixed_mark"):
            raise PluginValidationError(f"{owner}: strength_effect must be 'mad', 'psnr' or 'fixed_mark'")
        if cls.needs_model is not None:
            import inspect

            if cls.needs_model not in ATTACK_MODELS:
                raise PluginValidationError(f"{owner}: needs_model is {cls.needs_model!r}; allowed: "
                                            f"{', '.join(map(repr, ATTACK_MODELS))} or None")
            if "ctx" not in inspect.signature(cls.apply).parameters:
                raise PluginValidationError(f"{owner} declares needs_model, so apply() must take a 'ctx' argument")
        if cls.trains_surrogate and (cls.train_surrogate is ImageAttack.train_surrogate
                                     or "train_images" not in by_name):
            raise PluginValidationError(f"{owner} declares trains_surrogate, so it must implement train_surrogate() "
                                        f"and declare the parameter 'train_images'")
        if cls.can_forge and (cls.forge is ImageAttack.forge or not cls.forge_params):
            raise PluginValidationError(f"{owner} declares can_forge, so it must implement forge() and name the "
                                        f"parameters that make it a forgery (forge_params)")
        for s in (0.0, 0.5, 1.0):
            mapped = cls.natural_params(s)
            if not isinstance(mapped, dict):
                raise PluginValidationError(f"{owner}: from_strength({s}) must return a dict")
            unknown = [k for k in mapped if k not in by_name or k == "strength"]
            if unknown:
                raise PluginValidationError(
                    f"{owner}: from_strength({s}) returned {', '.join(map(repr, unknown))}, which is not a "
                    f"declared natural parameter")
            try:
                resolve_params(owner, cls.params, mapped)
            except ConfigError as exc:
                raise PluginValidationError(f"{owner}: from_strength({s}) gives an invalid value: {exc}") from None

    @classmethod
    def from_strength(cls, strength: float) -> dict[str, Any]:
        """Map a normalised strength, already clamped to [0, 1], to the natural parameters."""
        raise NotImplementedError

    def apply(self, images: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
        """Attack ``images``; an attack with ``needs_model`` has ``apply(images, generator, ctx)`` instead."""
        raise NotImplementedError

    @property
    def forges(self) -> bool:
        """Whether this configured attack is a forgery (its cell forges clean images); False by default."""
        return False

    def train_surrogate(self, marked: "torch.Tensor", clean: "torch.Tensor", generator: "torch.Generator",
                        ctx: AttackContext) -> "dict[str, torch.Tensor]":
        """Train the attacker's surrogate on its own marked and clean images (``train_images`` of each, from the
        watermarked model as the attacker can sample it and from the clean model); returns its tensors."""
        raise NotImplementedError

    def forge(self, clean: "torch.Tensor", marked: "torch.Tensor", generator: "torch.Generator",
              ctx: AttackContext) -> "torch.Tensor":
        """Make the clean images ``[N, 3, H, W]`` read as marked, learning the mark from ``marked`` (the defence's
        images the attacker has, ``[M, 3, H, W]``); returns the forged images, same shape as ``clean``."""
        raise NotImplementedError


class ModelAttack(Plugin):
    """A model-level attack: a pipeline in, a pipeline out. It never sees a defence's secret; a ``trigger_known``
    attack (:attr:`tier`) sees the trigger alone, through ``ctx.knowledge`` (:class:`DefenseKnowledge`).

    ``uses_data`` says whether it reads ``ctx.data`` (a downstream dataset at the run's image size, the run's
    prompts): the run's prompts and image size then become part of its stage key. Record the cost with
    ``ctx.record_cost(steps=..., trainable_params=...)``; the harness adds the wall time.
    """

    uses_data: ClassVar[bool] = False
    #: True for the no-op attack: the planner then adds no stage.
    identity: ClassVar[bool] = False
    #: True if the attacker samples the model with its standard sampler (``resample``): a defence whose mark is
    #: made at sampling time (``MarkLocation.INITIAL_NOISE``) then gets the plain generation, not its own.
    standard_sampling: ClassVar[bool] = False
    #: What the attack assumes the attacker has (shown by ``bench ls -v`` and in the attacker-utility notes), e.g.
    #: "the released watermarked weights and images of a new style".
    attacker_has: ClassVar[str] = ""
    #: Parameter values under which the attack gives the attacker *more* than the threat model (an attacker of
    #: released weights) allows, e.g. ``{"other": "base"}`` for a merge with the owner's clean base model.
    beyond_threat_model: ClassVar[Mapping[str, Any]] = {}
    #: What the attacker wants from it: ``"downstream"`` (a fine-tune that learns its ``dataset``: utility = how well
    #: the new style or subject is learnt), ``"compression"`` (a cheaper model: utility = the quality kept) or
    #: ``""`` (removal only: the quality kept is still measured).
    goal: ClassVar[str] = ""
    #: What the attack knows of the defence (:class:`ThreatTier`): ``blind`` (default), ``method_known`` or
    #: ``trigger_known`` (it then reads ``ctx.knowledge.trigger()``; its stage depends on the defence's embedding).
    tier: ClassVar[ThreatTier] = ThreatTier.BLIND
    #: True for an attack on the suspect *service*, not the weights: it leaves the weights alone and every prompt
    #: the served model is sampled with goes through :meth:`serve_prompt` (e.g. a filter of rare tokens).
    serves_prompts: ClassVar[bool] = False

    def serve_prompt(self, prompt: str) -> str:
        """What the suspect service does to a prompt before sampling (``serves_prompts`` attacks)."""
        return prompt

    def uses_second_marked_model(self) -> bool:
        """True if this instance needs a second, independently watermarked release of the model (the same defence
        embedded again with another key; for a defence that leaves the weights alone, the clean base): the planner
        then adds that embedding as a stage and ``ctx.data.second_marked_model()`` returns a copy of it. An attacker
        who holds two released watermarked models (and no key) is blind: no secret is read."""
        return False

    def exceeds_threat_model(self) -> bool:
        """True when this instance's parameters match :attr:`beyond_threat_model`."""
        b = type(self).beyond_threat_model
        return bool(b) and all(self.params.get(k) == v for k, v in b.items())

    def downstream_dataset(self) -> str | None:
        """The dataset a ``"downstream"`` attack learns (its ``dataset`` parameter), else None."""
        if type(self).goal != "downstream":
            return None
        return self.params.get("dataset")

    @classmethod
    def validate_class(cls, owner: str) -> None:
        from .errors import PluginValidationError

        if cls.goal not in ("", "downstream", "compression"):
            raise PluginValidationError(f"{owner}: 'goal' must be '', 'downstream' or 'compression', not "
                                        f"{cls.goal!r}")
        if cls.apply is ModelAttack.apply:
            raise PluginValidationError(f"{owner} must implement apply()")
        if not isinstance(cls.tier, ThreatTier):
            raise PluginValidationError(f"{owner}: class attribute 'tier' must be a ThreatTier "
                                        f"({', '.join(t.value for t in ThreatTier)})")
        if cls.serves_prompts and cls.serve_prompt is ModelAttack.serve_prompt:
            raise PluginValidationError(f"{owner} declares serves_prompts, so it must implement serve_prompt()")

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
    * ``clean_twins()``: the unwatermarked model's ordinary images for the same prompts and seeds (same model
      attack): the negatives' source and the reference of trigger-free fidelity.
    * ``twins()``: the *right* twin of ``unattacked_images()``: the clean model (same model attack) made to produce
      the same images the same way: the defence's own generation procedure run on the clean weights (for a trigger
      defence: the clean model given the trigger prompt); for post-hoc and plain-generation defences the clean
      model's ordinary images. ``paired_twin`` says whether image i of the twins is image i's paired counterpart
      (False for initial-noise marks: then ``twins()`` is the clean model's ordinary images, unpaired).
    * ``reference()``: the clean base model's images for the same prompts and seeds (no attack at all): the
      reference of FID and CLIP-score changes. ``reference_key`` identifies it, so a metric can keep reference
      statistics in ``shared`` (a dict that lives for the whole run) and compute them once per run.
    * ``prompts``: the prompt of each image; ``device``: where metrics may compute.
    * ``features``: the run's durable feature cache (:class:`bench.cache.FeatureCache`: ``load(identity, digest)``,
      ``save(identity, digest, tensor)``), where image-set metrics keep extracted features across runs and output
      folders (:mod:`bench.measures.features`); None outside a run.
    * ``model_attack``: the cell's model attack (its parameters, ``goal``, ``attacker_has``), and, when the
      ``attacker_utility`` metric is configured, the image sets it reads by name from ``loaders``:
      ``ordinary_marked`` (the attacked watermarked model's ordinary images) and, for a downstream fine-tune,
      ``downstream_marked`` / ``downstream_clean`` / ``downstream_base`` (held-out downstream captions' images of the
      attacked model, the equally attacked clean model and the unattacked base).
    * ``axis``: ``"removal"`` or ``"forgery"`` (see :class:`ImageAttack`); ``image_attack``: the cell's image attack.
    * ``detections``: further detections by name, loaded lazily: ``random_trigger`` (the verifier's reading of the
      watermarked, attacked model's images with random strings in the trigger's place), when the
      ``trigger_specificity`` metric is configured and the defence has a prompt trigger (:mod:`bench.triggers`).
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
    paired_twin: bool = True
    model_attack: "ModelAttack | None" = None
    features: Any = None
    #: ``"removal"`` or ``"forgery"`` (the cell forged clean images: ``images()`` are the forged images,
    #: ``unattacked_images()`` the clean images they were made from, ``negatives`` those clean images' detection)
    axis: str = "removal"
    #: the configured image attack of the cell (its parameters), None outside a run
    image_attack: "ImageAttack | None" = None
    detections: Mapping[str, Callable[[], Detection]] = field(default_factory=dict)
    #: per-image values by name, loaded lazily: ``heldout_loss_marked`` / ``heldout_loss_clean`` /
    #: ``heldout_loss_base`` / ``heldout_loss_start`` (the held-out downstream loss of the attacked watermarked model,
    #: the equally attacked clean model, the unattacked base and the unattacked watermarked model, :func:`bench.downstream.heldout_loss`), when ``attacker_utility`` is
    #: configured and the model attack trains on a downstream dataset
    values: Mapping[str, Callable[[], "torch.Tensor"]] = field(default_factory=dict)

    def images(self) -> "torch.Tensor":
        return self.loaders["images"]()

    def unattacked_images(self) -> "torch.Tensor":
        return self.loaders["unattacked"]()

    def clean_twins(self) -> "torch.Tensor":
        return self.loaders["clean_twins"]()

    def reference(self) -> "torch.Tensor":
        return self.loaders["reference"]()

    def twins(self) -> "torch.Tensor":
        """The right twin (see above); the clean model's ordinary images where the harness gave none."""
        return self.loaders["twins"]() if "twins" in self.loaders else self.clean_twins()


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

    @classmethod
    def outputs(cls, params: dict[str, Any], target_fprs: tuple[float, ...]) -> tuple[str, ...] | None:
        """The names of the measurements ``compute`` can return with these parameters (``run.primary_metric`` is
        checked against them before a run); None: not declared (then any name is accepted)."""
        return None
