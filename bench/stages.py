"""Executing one stage: read its inputs from the artifact store, call the plugin, check and write its output.

A stage function needs only the config and the artifact store, so it can run in this process, in a pool or on a
Ray worker alike (the in-memory caches below are per process and only an optimisation).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import OrderedDict
from typing import Any

import torch

from .cache import ArtifactStore, quantize
from .config import BenchConfig, PluginSpec
from .errors import PluginError
from .models import apply_overrides, diff_pipeline, rebuild_pipeline
from .plan import Plan, Stage, stage_seed
from .plugins import (AttackContext, DefenseKnowledge, Detection, DetectionKind, Embedding, GenerationRequest, Secret,
                      StageContext, ThreatTier, apply_image_attack, forge_images)

SECRET_PREFIX = "secret."
MODEL_PREFIX = "model."


class StageEnv:
    """Per-process state for executing stages: the config, the artifact store and small in-memory caches."""

    def __init__(self, cfg: BenchConfig, plan: Plan, store: ArtifactStore, progress=None):
        self.cfg = cfg
        self.plan = plan
        self.store = store
        self.progress = progress
        self._base = None
        self._pipes: OrderedDict[str, Any] = OrderedDict()
        self._plugins: dict[Any, Any] = {}
        self.placement: dict[str, Any] = {}  # where stages run (a Ray worker's node id), recorded in their meta

    # -- plugins & models -----------------------------------------------------------------------------------
    def plugin(self, spec: PluginSpec):
        if spec not in self._plugins:
            self._plugins[spec] = spec.instantiate()
        return self._plugins[spec]

    def base_pipeline(self):
        if self._base is None:
            from .modelcheck import load_base

            self._base = load_base(self.cfg)
        return self._base

    def pipeline(self, model_key: str):
        """The pipeline of a ``base``, ``embed`` or ``model_attack`` stage (base + stored overrides)."""
        stage = self.plan.stages[model_key]
        if stage.kind == "base":
            return self.base_pipeline()
        if model_key in self._pipes:
            self._pipes.move_to_end(model_key)
            return self._pipes[model_key]
        tensors = self.store.tensors(model_key)
        overrides = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        pipe = apply_overrides(self.base_pipeline(), overrides)
        self._pipes[model_key] = pipe
        while len(self._pipes) > 2:
            self._pipes.popitem(last=False)
        return pipe

    def secret(self, embed_key: str) -> Secret:
        tensors = self.store.tensors(embed_key)
        meta = self.store.meta(embed_key).get("secret_meta", {})
        return Secret({k[len(SECRET_PREFIX):]: v for k, v in tensors.items() if k.startswith(SECRET_PREFIX)}, meta)

    def knowledge(self, stage: Stage, attack) -> DefenseKnowledge:
        """What a model attack's stage may know of the defence, by the attack's tier (:class:`DefenseKnowledge`):
        a blind attack nothing; a ``method_known`` one the defence's name; a ``trigger_known`` one also the trigger,
        read by the defence itself (:meth:`Defense.known_trigger`) from the embedding its stage takes as a second input.
        The secret itself never leaves this function."""
        tier = ThreatTier(getattr(type(attack), "tier", ThreatTier.BLIND))
        knows = stage.extra_dict.get("knows") or {}
        if tier is ThreatTier.BLIND or not knows:
            return DefenseKnowledge(ThreatTier.BLIND)
        trigger = None
        if tier.sees_trigger() and len(stage.inputs) > 1:
            embed_key = stage.inputs[1]
            defense = self.plugin(self.plan.stages[embed_key].plugin)
            trigger = defense.known_trigger(self.secret(embed_key))
        return DefenseKnowledge(tier, method=knows.get("method"), trigger=trigger)

    def prompt_filter(self, model_key: str):
        """The prompt handling of a suspect service (``serve_prompt`` of a model attack with ``serves_prompts``)
        whose model ``model_key`` is, or None."""
        stage = self.plan.stages.get(model_key)
        if stage is None or stage.kind != "model_attack" or stage.plugin is None:
            return None
        attack = self.plugin(stage.plugin)
        return attack.serve_prompt if getattr(type(attack), "serves_prompts", False) else None

    def detection(self, key: str) -> Detection:
        t = self.store.tensors(key)
        return Detection(bits=t.get("bits"), scores=t.get("scores"))

    def request(self, seed: int, name: str = "") -> GenerationRequest:
        return self.plan.named_requests[name] if name else self.plan.requests[seed]

    def attack_context(self, stage: Stage) -> AttackContext:
        """The model an image attack declared (``needs_model = "base"``: the base pipeline this process already
        holds, loaded once); a context without a model for an attack that needs none (its costs are recorded)."""
        need = stage.extra_dict.get("attack_model")
        track = self.progress.track if self.progress is not None else None
        # an attack's trained surrogate: the last input of its image-attack / forge stage, when it has one
        n_images = {"image_attack": 1, "forge": 2}.get(stage.kind)
        surrogate = (self.store.tensors(stage.inputs[-1])
                     if n_images is not None and len(stage.inputs) > n_images else None)
        if not need:  # no model; still a place to record the attack's cost
            return AttackContext(device=self.cfg.run.device, progress=track, surrogate=surrogate)
        return AttackContext(model=self.base_pipeline(), model_fingerprint=need["fingerprint"],
                             device=self.cfg.run.device, progress=track, surrogate=surrogate)

    def context(self, stage: Stage) -> StageContext:
        gen = torch.Generator().manual_seed(stage_seed(stage.seed, stage.key))
        track = self.progress.track if self.progress is not None else None
        second = stage.extra_dict.get("second_marked")
        second_model = (lambda: copy_pipeline(self.pipeline(stage.inputs[second]))) if second is not None else None
        return StageContext(gen, self.cfg.run.device, progress=track, stage=stage.kind,
                            data=Resources(self.base_pipeline, self.cfg.model.height, self.cfg.model.width,
                                           self.cfg.prompt_list, self.cfg.model.num_inference_steps,
                                           second_marked_model=second_model),
                            variant=stage.extra_dict.get("variant", ""),
                            generate=lambda pipe, req, **kw: _generate(pipe, req, self.cfg.run.device, track, **kw))


class Resources:
    """What a training plugin may use besides its input model (``ctx.data``): the clean base model and datasets.

    A model attack gets no access to any defence's secret: only this, its parameters, the pipeline and its tier's
    view of the defence (``ctx.knowledge``).
    """

    def __init__(self, base_pipeline, height: int, width: int, prompts=None, num_inference_steps: int | None = None,
                 second_marked_model=None):
        self._base = base_pipeline  # a callable returning the (shared, read-only) base pipeline
        self.height = height
        self.width = width
        self.num_inference_steps = num_inference_steps  # the run's sampler steps (inversion-based verifiers)
        self._prompts = prompts or (lambda: [])
        self._second = second_marked_model  # a callable returning a private copy, or None

    def second_marked_model(self):
        """A private copy of a second, independently watermarked release of the model (the same defence, another
        key; :meth:`ModelAttack.uses_second_marked_model`). Only an attack that declared it gets one."""
        if self._second is None:
            raise PluginError("this attack did not declare uses_second_marked_model(): no second marked model is "
                              "planned for it")
        return self._second()

    def base_pipeline(self):
        """A private copy of the clean base model (e.g. for merging attacks)."""
        return copy_pipeline(self._base())

    def verifier_pipeline(self):
        """The clean base model itself, shared and read-only (a verifier that inverts images: never change it)."""
        return self._base()

    def dataset(self, spec: str, n: int, seed: int = 0):
        """``(images [N,3,H,W] in [0,1], captions)`` at the run's resolution; see :mod:`bench.data`."""
        from .data import load_image_captions

        return load_image_captions(spec, n, self.height, self.width, seed)

    def prompts(self) -> list[str]:
        return list(self._prompts())


def _generate(pipe, request, device, track, **kwargs):
    from .generation import generate_images

    return generate_images(pipe, request, device=device, progress=track, **kwargs)


def copy_pipeline(pipe):
    """A copy whose weights a plugin may change in place without touching the cached base."""
    components = dict(pipe.components)
    for name in ("unet", "vae", "text_encoder"):
        if components.get(name) is not None:
            components[name] = copy.deepcopy(components[name])
    return rebuild_pipeline(pipe, components)


def check_images(images: Any, who: str, expected: tuple[int, ...] | None) -> torch.Tensor:
    """Refuse what no later stage could use, in one sentence naming the plugin."""
    if not isinstance(images, torch.Tensor):
        raise PluginError(f"{who} returned {type(images).__name__}, expected a float tensor [N, 3, H, W]")
    if images.ndim != 4 or images.shape[1] != 3:
        raise PluginError(f"{who} returned images of shape {tuple(images.shape)}, expected [N, 3, H, W]")
    if expected is not None and tuple(images.shape) != expected:
        raise PluginError(f"{who} returned images of shape {tuple(images.shape)}, expected {expected}")
    images = images.detach().float().cpu()
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise PluginError(f"{who} returned {bad} image(s) containing NaN or infinite values")
    if images.min() < -1e-3 or images.max() > 1 + 1e-3:
        raise PluginError(f"{who} returned values in [{images.min():.3g}, {images.max():.3g}], expected [0, 1]")
    return quantize(images.clamp(0, 1))


def check_detection(det: Any, who: str, n: int, kind: DetectionKind, n_bits: int | None) -> Detection:
    if not isinstance(det, Detection):
        raise PluginError(f"{who}.detect returned {type(det).__name__}, expected bench.Detection")
    if kind is DetectionKind.BITS:
        if det.bits is None or det.bits.ndim != 2 or det.bits.shape[0] != n:
            shape = None if det.bits is None else tuple(det.bits.shape)
            raise PluginError(f"{who}.detect returned bits of shape {shape}, expected [{n}, k]")
        if n_bits is not None and det.bits.shape[1] != n_bits:
            raise PluginError(f"{who}.detect returned {det.bits.shape[1]} bits per image, but its message has "
                              f"{n_bits}")
        return Detection(bits=det.bits.bool().cpu(),
                         scores=None if det.scores is None else det.scores.float().cpu())
    if det.scores is None or det.scores.shape != (n,) or not torch.isfinite(det.scores).all():
        shape = None if det.scores is None else tuple(det.scores.shape)
        raise PluginError(f"{who}.detect returned scores of shape {shape} (or non-finite), expected [{n}] finite")
    return Detection(bits=None if det.bits is None else det.bits.bool().cpu(), scores=det.scores.float().cpu())


def run_stage(stage: Stage, env: StageEnv) -> dict[str, Any]:
    """Compute one stage and write it to the store; returns its metadata (timings, costs)."""
    store = env.store
    t0 = time.perf_counter()
    ctx = env.context(stage)
    meta: dict[str, Any] = {"kind": stage.kind, "label": stage.label, "inputs": list(stage.inputs),
                            "plugin": stage.plugin.identity() if stage.plugin else None, "seed": stage.seed}
    tensors: dict[str, torch.Tensor] | None = None
    images: torch.Tensor | None = None
    who = f"{stage.plugin.kind[:-1].replace('_', ' ')} '{stage.plugin.label}'" if stage.plugin else stage.kind

    if stage.kind == "base":
        env.base_pipeline()
    elif stage.kind == "embed":
        defense = env.plugin(stage.plugin)
        base = env.base_pipeline()
        out = defense.embed(copy_pipeline(base) if _modifies(defense) else base, ctx)
        if not isinstance(out, Embedding):
            raise PluginError(f"{who}.embed returned {type(out).__name__}, expected bench.Embedding")
        tensors = {SECRET_PREFIX + k: v for k, v in out.secret.tensors.items()}
        if out.pipeline is not None and out.pipeline is not base:
            tensors.update({MODEL_PREFIX + k: v for k, v in diff_pipeline(base, out.pipeline).items()})
        meta["secret_meta"] = out.secret.meta
    elif stage.kind == "model_attack":
        attack = env.plugin(stage.plugin)
        ctx.knowledge = env.knowledge(stage, attack)
        pipe = copy_pipeline(env.pipeline(stage.inputs[0]))
        out = attack.apply(pipe, ctx)
        if out is None:
            raise PluginError(f"{who}.apply returned None, expected a pipeline")
        tensors = {MODEL_PREFIX + k: v for k, v in diff_pipeline(env.base_pipeline(), out).items()}
    elif stage.kind == "generate":
        request = env.request(stage.extra_dict["run_seed"], stage.extra_dict.get("request_name", ""))
        pipe = env.pipeline(stage.inputs[0])
        served = env.prompt_filter(stage.inputs[0])
        if served is not None:  # a suspect service that rewrites prompts (a model attack with serves_prompts)
            track = env.progress.track if env.progress is not None else None
            ctx._generate = lambda p, req, **kw: _generate(p, req, env.cfg.run.device, track, prompt_filter=served,
                                                           **kw)
        if stage.plugin is None:
            images = ctx.generate(pipe, request)
        elif stage.extra_dict.get("probe"):
            request, meta["probe_strings"] = _trigger_probe(stage, env, pipe, request, ctx)
            meta["probe_prompts"] = list(request.prompts)  # what was sampled: checkable against the strings
            images = ctx.generate(pipe, request)
        else:
            defense = env.plugin(stage.plugin)
            images = defense.generate(pipe, env.secret(stage.inputs[1]), request, ctx)
        n = len(request.prompts)
        images = check_images(images, who if stage.plugin else "generation", (n, 3, request.height, request.width))
    elif stage.kind == "mark":
        defense = env.plugin(stage.plugin)
        clean = store.images(stage.inputs[0])
        images = check_images(defense.mark(clean.clone(), env.secret(stage.inputs[1]), ctx), f"{who}.mark",
                              tuple(clean.shape))
    elif stage.kind == "surrogate":
        attack = env.plugin(stage.plugin)
        marked, clean = store.images(stage.inputs[0]), store.images(stage.inputs[1])
        actx = env.attack_context(stage)
        tensors = attack.train_surrogate(marked, clean, ctx.generator, actx)
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise PluginError(f"{who}.train_surrogate returned {type(tensors).__name__}, expected a dict of tensors")
        ctx.costs.update(actx.costs)
    elif stage.kind == "image_attack":
        attack = env.plugin(stage.plugin)
        src = store.images(stage.inputs[0])
        actx = env.attack_context(stage)
        images = check_images(apply_image_attack(attack, src.clone(), ctx.generator, actx), who, tuple(src.shape))
        ctx.costs.update(actx.costs)
        ctx.costs.setdefault("images", int(src.shape[0]))
    elif stage.kind == "forge":
        attack = env.plugin(stage.plugin)
        clean = store.images(stage.inputs[0])
        marked = store.images(stage.inputs[1])
        actx = env.attack_context(stage)
        images = check_images(forge_images(attack, clean.clone(), marked.clone(), ctx.generator, actx),
                              f"{who}.forge", tuple(clean.shape))
        ctx.costs.update(actx.costs)
        ctx.costs.setdefault("images", int(clean.shape[0]))
    elif stage.kind == "detect":
        defense = env.plugin(stage.plugin)
        secret = env.secret(stage.inputs[0])
        imgs = store.images(stage.inputs[1])
        n_bits = int(defense.message(secret).numel()) if defense.detection is DetectionKind.BITS else None
        det = check_detection(defense.detect(secret, imgs, ctx), who, imgs.shape[0], defense.detection, n_bits)
        tensors = {k: v for k, v in (("bits", det.bits), ("scores", det.scores)) if v is not None}
    elif stage.kind == "downstream_loss":
        from .downstream import heldout_data, heldout_loss

        proto = stage.extra_dict["protocol"]
        data = heldout_data(proto["dataset"], int(proto["n"]), int(proto["height"]), int(proto["width"]),
                            skip=int(proto.get("skip", 0)), data_seed=int(proto["data_seed"]))
        if data is None:  # a folder with no image beyond those the attack trains on: no held-out loss
            tensors = {"loss": torch.zeros(0)}
            meta["note"] = f"dataset {proto['dataset']} has no held-out images beyond the first {proto.get('skip', 0)}"
        else:
            # stored as computed: a broken model's non-finite loss is reported by the metric, not a failed cell
            tensors = {"loss": heldout_loss(env.pipeline(stage.inputs[0]), data[0], data[1],
                                            noise_seed=int(proto["noise_seed"]), repeats=int(proto["repeats"]))}
    else:  # pragma: no cover - the planner makes no other kind
        raise ValueError(f"unknown stage kind {stage.kind}")

    meta["seconds"] = time.perf_counter() - t0
    meta["costs"] = ctx.costs
    meta.update(env.placement)
    if stage.kind != "base":
        store.write(stage.key, meta=meta, tensors=tensors, images=images)
    return meta


def _trigger_probe(stage: Stage, env: StageEnv, pipe, request: GenerationRequest, ctx: StageContext):
    """The request of a ``trigger_specificity`` probe (a ``generate`` stage with ``probe``): random strings of the
    trigger's token length in the trigger's place (:mod:`bench.triggers`). The harness reads the trigger from the
    embedding (the defender's side of the evaluation); the strings come from the stage's generator."""
    from .triggers import probe_request, random_strings, token_length, trigger_text

    probe = stage.extra_dict["probe"]
    defense = env.plugin(stage.plugin)
    trigger = defense.known_trigger(env.secret(stage.inputs[1]))
    if trigger is None or not trigger.in_prompt:
        raise PluginError(f"defence '{stage.plugin.label}' declares prompt_trigger but its known_trigger() gives no "
                          f"text in the prompt")
    text = trigger_text(trigger)
    strings = random_strings(pipe.tokenizer, token_length(pipe.tokenizer, text), int(probe["random_trigger"]),
                             ctx.generator, exclude=(text,))
    return probe_request(request, trigger, strings, int(probe["per_string"])), strings


def generation_settings(stage: Stage, env: StageEnv) -> tuple[str, GenerationRequest] | None:
    """What a plain generate stage samples with, less its prompts and seeds: ``(model key, settings)``, for
    grouping stages whose images may share batches (``run.batch_across_cells``); None for any other stage."""
    if stage.kind != "generate" or stage.plugin is not None:
        return None
    request = env.request(stage.extra_dict["run_seed"], stage.extra_dict.get("request_name", ""))
    if not request.pad_to_batch:
        return None
    return stage.inputs[0], dataclasses.replace(request, prompts=(), seeds=())


def run_generate_group(stages: list[Stage], env: StageEnv) -> dict[str, dict[str, Any]]:
    """Several plain generate stages of one model and one set of sampler settings in shared batches of exactly
    ``batch_size`` (``run.batch_across_cells``): their prompts and seeds are concatenated, sampled, split and each
    stage's images written as :func:`run_stage` writes them. With every batch full (the last padded), an image's
    pixels do not depend on the images beside it (tests/test_generation_groups.py checks it bit for bit), so each
    stage's images are those it gets alone. Returns each stage's metadata (its share of the time by image count)."""
    t0 = time.perf_counter()
    first = stages[0]
    settings = {generation_settings(s, env) for s in stages}
    if len(settings) != 1 or None in settings:
        raise ValueError("a generation group must share one model and one set of padded sampler settings")
    requests = [env.request(s.extra_dict["run_seed"], s.extra_dict.get("request_name", "")) for s in stages]
    merged = dataclasses.replace(requests[0], prompts=tuple(p for r in requests for p in r.prompts),
                                 seeds=tuple(s for r in requests for s in r.seeds))
    ctx = env.context(first)
    pipe = env.pipeline(first.inputs[0])
    served = env.prompt_filter(first.inputs[0])
    track = env.progress.track if env.progress is not None else None
    images = _generate(pipe, merged, env.cfg.run.device, track,
                       **({"prompt_filter": served} if served is not None else {}))
    n = len(merged.prompts)
    images = check_images(images, "generation", (n, 3, merged.height, merged.width))
    seconds = time.perf_counter() - t0
    out: dict[str, dict[str, Any]] = {}
    start = 0
    for stage, request in zip(stages, requests):
        k = len(request.prompts)
        meta = {"kind": stage.kind, "label": stage.label, "inputs": list(stage.inputs), "plugin": None,
                "seed": stage.seed, "seconds": seconds * k / n, "costs": ctx.costs,
                "batched_with": len(stages), **env.placement}
        env.store.write(stage.key, meta=meta, tensors=None, images=images[start:start + k])
        out[stage.key] = meta
        start += k
    return out


def _modifies(defense) -> bool:
    from .plan import modifies_model

    return modifies_model(type(defense))
