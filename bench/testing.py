"""Testing helpers and the plugin contract suite, for MarkBench's own tests and for third-party plugin packages.

Helpers: :func:`make_context` (the :class:`~bench.StageContext` a stage hands a plugin), :func:`micro_pipeline`
(a Stable-Diffusion-architecture pipeline with random weights, built from configs: no download),
:func:`copy_pipeline`, :func:`sample_images`, :func:`generation_request`, and the harness's own output checks
:func:`check_images` and :func:`check_detection`.

The contract suite is what the harness relies on from every plugin of a kind. A package runs it on its own
plugins with pytest::

    import pytest
    from markbench.testing import contract_cases
    from acme_marks import AcmeMark, Posterize

    @pytest.mark.parametrize("plugin, check", contract_cases(AcmeMark, Posterize))
    def test_contract(plugin, check):
        check(plugin)

Each case is one check of one plugin (test id ``posterize-effect_grows_with_strength``); a failing check raises
``AssertionError`` with a sentence naming the plugin. :func:`run_contract` runs every check of one plugin at once.
Image attacks describe themselves to the checks with class attributes (``deterministic``,
``zero_strength_tolerance``, ``strength_effect``, ``identity``); defences, model attacks and metrics take their
``smoke_params`` (e.g. a few training steps) so that the checks stay fast.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Sequence

import torch

from .plugins import (AttackContext, Defense, DefenseKnowledge, Detection, DetectionKind, Embedding, GenerationRequest,
                      ImageAttack, MarkLocation, MeasureContext, Measurement, Metric, ModelAttack, Plugin, StageContext,
                      Trigger, apply_image_attack)
from .stages import Resources  # ctx.data: what a training plugin may read besides its input model

__all__ = [
    "make_context", "micro_pipeline", "copy_pipeline", "sample_images", "generation_request", "check_images",
    "check_detection", "quantize", "contract_checks", "contract_cases", "run_contract", "PROMPT", "Resources",
    "attack_context", "run_attack", "knowledge_for", "TEST_TRIGGER",
]

#: A caption of the tiny world, used where a check needs a prompt.
PROMPT = "a red circle on a blue background"


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def make_context(seed: int = 0, *, pipe: Any = None, height: int = 64, width: int = 64,
                 prompts: Sequence[str] = (PROMPT,), device: str = "cpu", variant: str = "",
                 knowledge: DefenseKnowledge | None = None) -> StageContext:
    """A :class:`~bench.StageContext` as a stage gets it: a generator seeded with ``seed`` and, with ``pipe``,
    ``ctx.data`` (the clean base model, datasets at ``height`` x ``width``, the run's prompts); ``knowledge``: what a
    model attack knows of the defence (default: the sealed, blind view)."""
    data = Resources(lambda: pipe, height, width, lambda: list(prompts)) if pipe is not None else None
    return StageContext(torch.Generator().manual_seed(seed), device, data=data, variant=variant, knowledge=knowledge)


#: The trigger a ``trigger_known`` model attack is given by the contract checks (SleeperMark's default prefix).
TEST_TRIGGER = Trigger(prompt_prefix="*[Z]& ")


def knowledge_for(plugin: type[ModelAttack], trigger: Trigger | None = TEST_TRIGGER,
                  method: str = "sleepermark") -> DefenseKnowledge:
    """What the harness would hand a model attack of ``plugin``'s tier (:class:`~bench.DefenseKnowledge`): the
    trigger only to a ``trigger_known`` one, the method's name to a ``method_known`` one, nothing to a blind one."""
    return DefenseKnowledge(plugin.tier, method=method, trigger=trigger)


#: the SD-architecture model the contract suite runs plugins on (random weights, built from configs by its world)
TEST_MODEL = "micro-sd"


@functools.lru_cache(maxsize=1)
def _micro_pipeline() -> Any:
    from .config import ModelConfig
    from .models import load_pipeline

    return load_pipeline(ModelConfig(builtin=TEST_MODEL))


def micro_pipeline() -> Any:
    """The ``micro-sd`` pipeline (random weights, SD architecture, built once per process). Shared: plugins that
    change weights in place must get :func:`copy_pipeline` of it."""
    return _micro_pipeline()


def copy_pipeline(pipe: Any) -> Any:
    """A copy whose weights a plugin may change in place without touching ``pipe``."""
    from .stages import copy_pipeline as _copy

    return _copy(pipe)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """What images are after a round trip through an 8-bit file (what the next stage sees)."""
    from .cache import quantize as _quantize

    return _quantize(images)


def check_images(images: Any, who: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
    """The harness's check of a plugin's images (tensor ``[N, 3, H, W]``, finite, in [0, 1]); returns them as
    the next stage would see them (8-bit). Raises :class:`~bench.PluginError` naming ``who``."""
    from .stages import check_images as _check

    return _check(images, who, expected)


def check_detection(det: Any, who: str, n: int, kind: DetectionKind | str,
                    n_bits: int | None = None) -> Detection:
    """The harness's check of a :class:`~bench.Detection` of ``n`` images (bits ``[n, n_bits]`` or scores
    ``[n]``). Raises :class:`~bench.PluginError` naming ``who``."""
    from .stages import check_detection as _check

    return _check(det, who, n, DetectionKind(kind), n_bits)


def sample_images(n: int = 3, size: int = 48, seed: int = 1234) -> torch.Tensor:
    """Image-like test images ``[n, 3, size, size]``: smooth random colour fields plus mild texture, 8-bit."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    texture = 0.08 * (torch.rand(n, 3, size, size, generator=g) - 0.5)
    return quantize((smooth + texture).clamp(0.0, 1.0))


def generation_request(n: int = 2, size: int = 64, steps: int = 2, prompt: str = PROMPT) -> GenerationRequest:
    """A small :class:`~bench.GenerationRequest`: ``n`` images of ``prompt`` at ``size`` px, seeds 1..n."""
    return GenerationRequest(prompts=(prompt,) * n, seeds=tuple(range(1, n + 1)), height=size, width=size,
                             num_inference_steps=steps, guidance_scale=7.5, batch_size=n)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _name(plugin: type) -> str:
    return getattr(plugin, "name", "") or plugin.__name__


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


#: The pipeline the image-attack checks hand an attack that declares ``needs_model`` (a zero-argument callable;
#: :func:`contract_cases` ``model=`` sets it for its checks). Default: :func:`micro_pipeline`.
_ATTACK_MODEL: list[Callable[[], Any]] = [lambda: micro_pipeline()]


def attack_context(model: Any = None) -> AttackContext:
    """The :class:`~bench.AttackContext` a stage hands an attack with ``needs_model``: ``model`` (default: the
    contract suite's model, :func:`micro_pipeline` unless ``contract_cases(model=...)`` named another)."""
    return AttackContext(model=model if model is not None else _ATTACK_MODEL[-1](), model_fingerprint="test")


def run_attack(attack: ImageAttack, images: torch.Tensor, generator: torch.Generator,
               model: Any = None) -> torch.Tensor:
    """``attack.apply`` as the harness calls it: with an :func:`attack_context` for an attack that needs a model,
    and a trained surrogate (:func:`trained_surrogate`) for one that ``trains_surrogate``."""
    ctx = attack_context(model) if type(attack).needs_model else None
    if type(attack).trains_surrogate:
        ctx = ctx or AttackContext()
        ctx.surrogate = trained_surrogate(attack, images.shape[-1])
    return apply_image_attack(attack, images, generator, ctx)


def trained_surrogate(attack: ImageAttack, size: int = 48) -> dict[str, torch.Tensor]:
    """What the harness's ``surrogate`` stage gives an attack that ``trains_surrogate``: trained on 8 sample
    images carrying a fixed +-6/255 pattern against the same 8 without it (seeded)."""
    clean = sample_images(8, size, seed=55)
    mark = (torch.randint(0, 2, (1, 3, size, size), generator=_gen(56)).float() * 2 - 1) * (6 / 255)
    ctx = attack_context() if type(attack).needs_model else AttackContext()
    return attack.train_surrogate((clean + mark).clamp(0, 1), clean, _gen(57), ctx)


def _attack(plugin: type[ImageAttack], **params: Any) -> ImageAttack:
    """The attack with its ``smoke_params`` (a slow attack's cheap settings) under ``params``."""
    return plugin(**{**plugin.smoke_params, **params})


# ---------------------------------------------------------------------------------------------------------------
# Every plugin
# ---------------------------------------------------------------------------------------------------------------
def declaration_is_valid(plugin: type[Plugin]) -> None:
    """The class would register: version, parameter declarations, the base class's own rules; a docstring whose
    first line is the summary ``bench ls`` shows; its defaults instantiate."""
    from .errors import PluginValidationError
    from .params import validate_declarations

    name = _name(plugin)
    owner = f"{name} ({plugin.__module__}:{plugin.__qualname__})"
    _expect(isinstance(plugin.version, str) and bool(plugin.version), f"{owner}: 'version' must be a non-empty str")
    try:
        validate_declarations(owner, plugin.params)
        if hasattr(plugin, "validate_class"):
            plugin.validate_class(owner)
    except PluginValidationError as exc:
        raise AssertionError(str(exc)) from None
    _expect(bool(plugin.summary()), f"{owner}: the docstring must start with a one-line summary")
    plugin()


# ---------------------------------------------------------------------------------------------------------------
# Image attacks
# ---------------------------------------------------------------------------------------------------------------
def from_strength_gives_declared_values(plugin: type[ImageAttack]) -> None:
    """``from_strength(s)`` for s in [0, 1] returns declared natural parameters with valid values, and
    ``plugin(strength=s)`` uses them."""
    by_name = {p.name: p for p in plugin.params}
    name = _name(plugin)
    for i in range(21):
        s = i / 20
        natural = plugin.natural_params(s)
        for key, value in natural.items():
            _expect(key in by_name and key != "strength", f"{name}.from_strength({s}) returned unknown '{key}'")
            try:
                ok = by_name[key].check(value) == value
            except ValueError as exc:
                raise AssertionError(f"{name}.from_strength({s}) -> {key}={value!r} is invalid: it {exc}") from None
            _expect(ok, f"{name}.from_strength({s}) -> {key}={value!r} is not normalised")
        inst = plugin(strength=s)
        for key, value in natural.items():
            _expect(inst.params[key] == value and getattr(inst, key) == value,
                    f"{name}(strength={s}) does not use {key}={value!r}")
    _expect(plugin.natural_params(1.7) == plugin.natural_params(1.0), f"{name}: strength is not clamped to [0, 1]")


def output_is_images_in_range(plugin: type[ImageAttack]) -> None:
    """At its defaults and strengths 0, 0.5, 1: same shape, float32 on the CPU, finite, in [0, 1]."""
    images = sample_images()
    for params in ({}, {"strength": 0.0}, {"strength": 0.5}, {"strength": 1.0}):
        out = run_attack(_attack(plugin, **params), images.clone(), _gen(3))
        who = f"{_name(plugin)}({params})"
        _expect(isinstance(out, torch.Tensor) and out.shape == images.shape,
                f"{who} returned {getattr(out, 'shape', type(out).__name__)}, expected {tuple(images.shape)}")
        _expect(out.dtype == torch.float32 and out.device.type == "cpu", f"{who} returned {out.dtype} on {out.device}")
        _expect(bool(torch.isfinite(out).all()), f"{who} returned non-finite values")
        _expect(float(out.min()) >= 0.0 and float(out.max()) <= 1.0, f"{who} returned values outside [0, 1]")


def same_seed_is_bit_identical(plugin: type[ImageAttack]) -> None:
    """Two runs with identically seeded generators give bit-identical images."""
    images = sample_images()
    for params in ({}, {"strength": 0.7}):
        a = run_attack(_attack(plugin, **params), images.clone(), _gen(42))
        b = run_attack(_attack(plugin, **params), images.clone(), _gen(42))
        _expect(torch.equal(a, b), f"{_name(plugin)}({params}) differs between identically seeded runs")


def no_global_rng_and_no_inplace(plugin: type[ImageAttack]) -> None:
    """Randomness only from the generator passed in (torch's and numpy's global RNGs untouched); the input
    tensor is not modified."""
    import numpy as np

    images = sample_images()
    x = images.clone()
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    run_attack(_attack(plugin, strength=0.8), x, _gen(5))
    _expect(torch.equal(torch.get_rng_state(), torch_state), f"{_name(plugin)} used torch's global RNG")
    _expect(bool(np.array_equal(np.random.get_state()[1], np_state)), f"{_name(plugin)} used numpy's global RNG")
    _expect(torch.equal(x, images), f"{_name(plugin)} modified its input in place")


def zero_strength_is_near_identity(plugin: type[ImageAttack]) -> None:
    """At strength 0 the mean absolute change is at most the class's ``zero_strength_tolerance``."""
    images = sample_images()
    out = run_attack(_attack(plugin, strength=0.0), images.clone(), _gen(9))
    tol = plugin.zero_strength_tolerance
    _expect(_mad(out, images) <= tol,
            f"{_name(plugin)} at strength 0: mean abs diff {_mad(out, images):.4g} > zero_strength_tolerance {tol}")


def effect_grows_with_strength(plugin: type[ImageAttack]) -> None:
    """The effect (``strength_effect``: mean absolute change, or loss of PSNR) grows from strength 0 to 1 (small
    wiggles tolerated). The identity attack is exempt."""
    if plugin.identity:
        return
    images = sample_images()
    name = _name(plugin)
    strengths = (0.0, 0.25, 0.5, 0.75, 1.0)
    if plugin.strength_effect == "fixed_mark":
        # a batch carrying one fixed additive pattern (what a fixed-key mark is); effect: how close the output comes
        # to the unmarked images (minus the mean squared error to them)
        clean = sample_images(16, 32, seed=77)
        mark = (torch.randint(0, 2, (1, 3, 32, 32), generator=_gen(78)).float() * 2 - 1) * (6 / 255)
        marked = (clean + mark).clamp(0, 1)
        outs = [run_attack(_attack(plugin, strength=s), marked, _gen(11)) for s in strengths]
        effect = [-float(((o - clean) ** 2).mean()) for o in outs]
    else:
        outs = [run_attack(_attack(plugin, strength=s), images, _gen(11)) for s in strengths]
        if plugin.strength_effect == "psnr":
            effect = [-_psnr(o, images) for o in outs]
        else:
            effect = [_mad(o, images) for o in outs]
    span = abs(effect[-1] - effect[0])
    _expect(span > 0, f"{name}: strength has no effect: {effect}")
    _expect(effect[1] < effect[-1], f"{name}: strength 0.25 not weaker than 1.0: {effect}")
    _expect(effect[0] <= effect[1], f"{name}: strength 0 not weaker than 0.25: {effect}")
    for lo, hi in zip(effect, effect[1:]):
        _expect(hi >= lo - 0.05 * span, f"{name}: effect decreases with strength: {effect}")


def batch_equals_per_image(plugin: type[ImageAttack]) -> None:
    """For a ``deterministic`` attack: a batch equals its images processed one by one, and the generator does not
    matter. (Random attacks are exempt.)"""
    if not plugin.deterministic:
        return
    images = sample_images()
    attack = _attack(plugin, strength=0.6)
    batch = run_attack(attack, images, _gen(0))
    single = torch.cat([run_attack(attack, images[i:i + 1], _gen(0)) for i in range(images.shape[0])])
    _expect(bool(torch.allclose(batch, single, atol=1e-6)), f"{_name(plugin)}: a batch differs from its images one "
                                                             f"by one")
    _expect(torch.equal(batch, run_attack(attack, images, _gen(99))),
            f"{_name(plugin)} is declared deterministic but depends on the generator")


def forgery_is_images_in_range(plugin: type[ImageAttack]) -> None:
    """For an attack that can forge (``can_forge``): with its ``forge_params`` it declares itself a forgery, and
    ``forge(clean, marked, generator, ctx)`` returns images of the clean images' shape, float32, finite, in [0, 1],
    bit-identical under the same seed, without changing its inputs; its default parameters are not a forgery.
    (Attacks that cannot forge are exempt.)"""
    if not plugin.can_forge:
        return
    name = _name(plugin)
    _expect(not _attack(plugin).forges, f"{name}: its default parameters must be a removal attack")
    attack = _attack(plugin, **plugin.forge_params)
    _expect(attack.forges, f"{name}({plugin.forge_params}) does not declare itself a forgery (forges is False)")
    clean, marked = sample_images(), sample_images(seed=31)
    c0, m0 = clean.clone(), marked.clone()

    def forge(seed: int) -> torch.Tensor:
        ctx = attack_context() if plugin.needs_model else AttackContext()
        if plugin.trains_surrogate:
            ctx.surrogate = trained_surrogate(attack, clean.shape[-1])
        return attack.forge(clean, marked, _gen(seed), ctx)

    out = forge(4)
    _expect(isinstance(out, torch.Tensor) and out.shape == clean.shape and out.dtype == torch.float32,
            f"{name}.forge returned {getattr(out, 'shape', type(out).__name__)}, expected {tuple(clean.shape)} float32")
    _expect(bool(torch.isfinite(out).all()) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0,
            f"{name}.forge returned values outside [0, 1]")
    _expect(torch.equal(out, forge(4)), f"{name}.forge differs between identically seeded runs")
    _expect(torch.equal(clean, c0) and torch.equal(marked, m0), f"{name}.forge modified its inputs in place")


IMAGE_ATTACK_CHECKS: tuple[Callable[[type], None], ...] = (
    declaration_is_valid, from_strength_gives_declared_values, output_is_images_in_range,
    same_seed_is_bit_identical, no_global_rng_and_no_inplace, zero_strength_is_near_identity,
    effect_grows_with_strength, batch_equals_per_image, forgery_is_images_in_range,
)


# ---------------------------------------------------------------------------------------------------------------
# Defences, model attacks, metrics (on the micro pipeline, with the plugin's smoke_params)
# ---------------------------------------------------------------------------------------------------------------
def defense_embeds_generates_detects(plugin: type[Defense]) -> None:
    """``embed`` on a copy of the micro pipeline, marked images (``mark`` for post-hoc, else ``generate``) that
    pass the harness's image checks, a detection of the right kind and size, deterministic; another seed gives
    another message (multi-bit)."""
    from .generation import generate_images

    pipe = micro_pipeline()
    request = generation_request()
    name = _name(plugin)
    d = plugin(**plugin.smoke_params)
    emb = d.embed(copy_pipeline(pipe), make_context(0, pipe=pipe))
    _expect(isinstance(emb, Embedding), f"{name}.embed returned {type(emb).__name__}, expected bench.Embedding")
    model = emb.pipeline or pipe
    if plugin.location is MarkLocation.POST_HOC:
        images = d.mark(generate_images(pipe, request), emb.secret, make_context(1))
    else:
        images = d.generate(model, emb.secret, request, make_context(1))
    n = len(request.prompts)
    images = check_images(images, name, (n, 3, request.height, request.width))
    n_bits = d.message(emb.secret).numel() if plugin.detection is DetectionKind.BITS else None
    # the verifier may need the model (sampling-time marks invert the images through it)
    det = check_detection(d.detect(emb.secret, images, make_context(2, pipe=pipe)), name, n, plugin.detection,
                          n_bits)
    again = check_detection(d.detect(emb.secret, images, make_context(2, pipe=pipe)), name, n, plugin.detection,
                            n_bits)
    if det.bits is not None:
        _expect(torch.equal(det.bits, again.bits), f"{name}.detect is not deterministic")
    else:
        _expect(torch.equal(det.scores, again.scores), f"{name}.detect is not deterministic")
    if plugin.detection is DetectionKind.BITS:
        other = d.embed(copy_pipeline(pipe), make_context(5, pipe=pipe))
        _expect(not torch.equal(d.message(emb.secret), d.message(other.secret)),
                f"{name}: two embedding seeds gave the same message")


def model_attack_returns_a_working_pipeline(plugin: type[ModelAttack]) -> None:
    """``apply`` on a copy returns a pipeline that generates finite images; the input pipeline is untouched; a
    non-identity attack records its cost (``steps``)."""
    from .generation import generate_images

    pipe = micro_pipeline()
    request = generation_request()
    name = _name(plugin)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ctx = make_context(0, pipe=pipe, knowledge=knowledge_for(plugin))  # a blind attack: a sealed view
    attacked = plugin(**plugin.smoke_params).apply(copy_pipeline(pipe), ctx)
    _expect(attacked is not None, f"{name}.apply returned None, expected a pipeline")
    images = generate_images(attacked, request)
    _expect(images.shape == (len(request.prompts), 3, request.height, request.width) and
            bool(torch.isfinite(images).all()), f"{name}: the attacked pipeline does not generate finite images")
    _expect(all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items()),
            f"{name} changed the shared base pipeline in place")
    if not plugin.identity:
        _expect("steps" in ctx.costs, f"{name} records no cost (ctx.record_cost(steps=...))")
    if plugin.serves_prompts:
        served = plugin(**plugin.smoke_params).serve_prompt(TEST_TRIGGER.prompt_prefix + PROMPT)
        _expect(isinstance(served, str), f"{name}.serve_prompt returned {type(served).__name__}, expected str")


def metric_computes_on_a_synthetic_cell(plugin: type[Metric]) -> None:
    """On a synthetic multi-bit cell (45 of 48 bits right on 8 images, random negatives, random bits for the
    random-trigger probe of ``ctx.detections``): a non-empty list of
    :class:`~bench.Measurement` with N > 0 and finite-or-NaN values (for a metric that measures nothing in a removal
    cell, in the same cell as a forgery cell)."""
    from .registries import defenses, model_attacks

    g = _gen(0)
    message = torch.randint(0, 2, (48,), generator=g).bool()
    pos = message.repeat(8, 1)
    pos[:, :3] = ~pos[:, :3]
    neg = torch.randint(0, 2, (8, 48), generator=g).bool()
    imgs = torch.rand(8, 3, 32, 32, generator=g)
    ctx = MeasureContext(defense=defenses.get("none")(), detection=Detection(bits=pos),
                         negatives=Detection(bits=neg), message=message, target_fprs=(1e-6,), generator=g,
                         loaders={"images": lambda: imgs, "unattacked": lambda: imgs, "clean_twins": lambda: imgs,
                                  "reference": lambda: imgs, "twins": lambda: imgs, "ordinary_marked": lambda: imgs},
                         prompts=(PROMPT,) * 8,
                         model_attack=model_attacks.get("prune")(),  # a model-attacked cell: attacker utility
                         # the random-string probe of a prompt trigger (trigger_specificity): the mark asleep
                         detections={"random_trigger": lambda: Detection(bits=neg)})
    out = plugin(**plugin.smoke_params).compute(ctx)
    if not out:  # a metric of forgery cells only (the ``forgery`` metric): the same cell as a forgery
        ctx.axis = "forgery"
        out = plugin(**plugin.smoke_params).compute(ctx)
    name = _name(plugin)
    _expect(bool(out) and all(isinstance(m, Measurement) and m.n > 0 for m in out),
            f"{name}.compute returned {out!r}, expected Measurements with N > 0")


CHECKS: dict[type, tuple[Callable[[type], None], ...]] = {
    ImageAttack: IMAGE_ATTACK_CHECKS,
    Defense: (declaration_is_valid, defense_embeds_generates_detects),
    ModelAttack: (declaration_is_valid, model_attack_returns_a_working_pipeline),
    Metric: (declaration_is_valid, metric_computes_on_a_synthetic_cell),
}


def contract_checks(plugin: type) -> tuple[Callable[[type], None], ...]:
    """The checks for ``plugin``'s kind (by its base class)."""
    for base, checks in CHECKS.items():
        if isinstance(plugin, type) and issubclass(plugin, base):
            return checks
    raise TypeError(f"{plugin!r} is not a subclass of bench.Defense, ImageAttack, ModelAttack or Metric")


def _with_model(check: Callable[[type], None], model: Callable[[], Any]) -> Callable[[type], None]:
    @functools.wraps(check)
    def wrapped(plugin: type) -> None:
        _ATTACK_MODEL.append(model)
        try:
            check(plugin)
        finally:
            _ATTACK_MODEL.pop()
    return wrapped


def contract_cases(*plugins: type | Iterable[type], model: Callable[[], Any] | None = None) -> list[Any]:
    """``(plugin, check)`` pairs for ``pytest.mark.parametrize("plugin, check", ...)``, one per check of each
    plugin, with ids ``<plugin name>-<check>``.

    ``model``: a zero-argument callable returning the pipeline that image attacks declaring ``needs_model`` get
    (default :func:`micro_pipeline`, random weights; a trained model, e.g. the tiny world's, makes the checks of
    regeneration attacks meaningful)."""
    flat: list[type] = []
    for p in plugins:
        flat.extend([p] if isinstance(p, type) else list(p))

    def checks(p: type) -> list[Callable[[type], None]]:
        cs = contract_checks(p)
        if model is not None and isinstance(p, type) and issubclass(p, ImageAttack) and p.needs_model:
            return [_with_model(c, model) for c in cs]
        return list(cs)
    try:
        import pytest
    except ImportError:  # pragma: no cover - the pairs alone, without ids
        return [(p, c) for p in flat for c in checks(p)]
    return [pytest.param(p, c, id=f"{_name(p)}-{c.__name__}") for p in flat for c in checks(p)]


def run_contract(plugin: type) -> None:
    """Run every check of ``plugin``'s kind; the first failure raises ``AssertionError``."""
    for check in contract_checks(plugin):
        check(plugin)
