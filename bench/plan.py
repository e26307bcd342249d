"""The planner: expands a config into cells and the graph of stages they need.

A cell is (defence, model attack, image attack, seed). Its stages, each keyed by a content hash of its inputs' keys,
the plugin's name, version and parameters, and the seed:

``base`` -> ``embed`` (defence) -> ``model_attack`` -> ``generate`` (or ``mark`` for post-hoc defences) ->
``image_attack`` -> ``detect``; then the cell is *measured* (metrics into the results database).

Sharing falls out of the keys: the base model's plain images under a model attack are both the ``none`` defence's
images, the clean twins for quality metrics and the negatives for every defence; a defence with its own generation
procedure (a trigger) also gets its *right twin*, that procedure run on the equally attacked clean model (shared with
a white-box defence's negatives), the reference of its fidelity metrics (``Cell.twins``); a defence that does not
change the weights (post-hoc, initial-noise) shares the attacked base model; identity attacks add no stage at all.
"""

from __future__ import annotations

import dataclasses

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .cache import stable_hash
from .config import BenchConfig, PluginSpec
from .models import model_fingerprint, named_model_identity
from .plugins import Defense, GenerationRequest, MarkLocation, NegativePolicy, ThreatTier, Verification

STAGE_KINDS = ("base", "embed", "model_attack", "generate", "mark", "image_attack", "forge", "surrogate", "detect",
               "downstream_loss")

#: A cell's axis: ``removal`` (marked images attacked, TPR) or ``forgery`` (clean images forged, FPR).
AXES = ("removal", "forgery")


@dataclass(frozen=True)
class Stage:
    kind: str
    key: str
    inputs: tuple[str, ...]
    plugin: PluginSpec | None = None
    seed: int = 0
    label: str = ""
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def extra_dict(self) -> dict[str, Any]:
        return dict(self.extra)


@dataclass(frozen=True)
class Cell:
    defense: PluginSpec
    model_attack: PluginSpec
    image_attack: PluginSpec
    seed: int
    key: str
    embed: str
    images: str
    unattacked: str
    clean_twins: str
    negatives: str
    detect_pos: str
    detect_neg: str
    variant: str = ""
    reference: str = ""  # the unattacked base model's plain images (FID / CLIP-score reference)
    twins: str = ""  # the right twin: the clean (equally attacked) model's images made as `unattacked` was made
    #: further image sets a metric may load by name (the attacker-utility images of a model-attacked cell)
    extra_images: tuple[tuple[str, str], ...] = ()
    #: ``removal``, or ``forgery`` for a forging image attack: then ``images`` are forged clean images,
    #: ``unattacked`` the clean images they were made from, ``negatives`` the same clean images unforged
    axis: str = "removal"
    #: further detections a metric may load by name (``random_trigger``: the ``trigger_specificity`` probe)
    extra_detections: tuple[tuple[str, str], ...] = ()
    #: per-image values a metric may load by name (``heldout_loss_marked`` / ``_clean`` / ``_base``: the
    #: ``downstream_loss`` stages of a downstream fine-tune, for the attacker-utility metric)
    extra_values: tuple[tuple[str, str], ...] = ()

    @property
    def defense_label(self) -> str:
        """The defence's label, with ``[variant]`` for a generation variant (e.g. ``sleepermark[no_trigger]``)."""
        return self.defense.label + (f"[{self.variant}]" if self.variant else "")

    @property
    def label(self) -> str:
        return f"{self.defense_label}/{self.model_attack.label}/{self.image_attack.label}/s{self.seed}"

    def stage_keys(self) -> tuple[str, ...]:
        keys = (self.detect_pos, self.detect_neg, self.images, self.unattacked, self.clean_twins, self.negatives)
        return (keys + tuple(k for k in (self.reference, self.twins) if k) + tuple(k for _, k in self.extra_images)
                + tuple(k for _, k in self.extra_detections) + tuple(k for _, k in self.extra_values))


@dataclass
class Plan:
    stages: dict[str, Stage] = field(default_factory=dict)  # insertion order is a valid execution order
    cells: list[Cell] = field(default_factory=list)
    requests: dict[int, GenerationRequest] = field(default_factory=dict)
    #: other prompt sets, by name (e.g. a downstream task's held-out captions for the attacker-utility images)
    named_requests: dict[str, GenerationRequest] = field(default_factory=dict)

    def closure(self, cells: list[Cell]) -> list[Stage]:
        """Every stage the given cells need, in dependency order."""
        needed: set[str] = set()
        stack = [k for c in cells for k in c.stage_keys()]
        while stack:
            k = stack.pop()
            if k in needed:
                continue
            needed.add(k)
            stack.extend(self.stages[k].inputs)
        return [s for k, s in self.stages.items() if k in needed]

    def select(self, pattern: str | None) -> list[Cell]:
        if not pattern:
            return list(self.cells)
        pat = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
        return [c for c in self.cells if fnmatch.fnmatchcase(c.label, pat)]


def image_seed(run_seed: int, index: int) -> int:
    """The sampler seed of image ``index``: shared by every defence so that images are paired across cells."""
    return int(stable_hash(["image-seed", run_seed, index])[:15], 16)


def stage_seed(run_seed: int, key: str) -> int:
    """The seed of a stage's ``torch.Generator``: a function of the run seed and the stage key only."""
    return int(stable_hash(["stage-seed", run_seed, key])[:15], 16)


def generation_request(cfg: BenchConfig, run_seed: int) -> GenerationRequest:
    prompts = cfg.prompt_list()
    n = cfg.run.num_images
    m = cfg.model
    return GenerationRequest(
        prompts=tuple(prompts[i % len(prompts)] for i in range(n)),
        seeds=tuple(image_seed(run_seed, i) for i in range(n)),
        height=m.height, width=m.width, num_inference_steps=m.num_inference_steps,
        guidance_scale=m.guidance_scale, batch_size=cfg.run.batch_size, negative_prompt=m.negative_prompt or None,
        channels_last=cfg.run.channels_last, compile=cfg.run.compile, pad_to_batch=cfg.run.batch_across_cells,
    )


def downstream_request(cfg: BenchConfig, run_seed: int, captions: list[str]) -> GenerationRequest:
    """The run's sampler settings on a downstream task's held-out captions, with seeds of their own."""
    m = cfg.model
    return GenerationRequest(
        prompts=tuple(captions),
        seeds=tuple(int(stable_hash(["downstream-seed", run_seed, i])[:15], 16) for i in range(len(captions))),
        height=m.height, width=m.width, num_inference_steps=m.num_inference_steps,
        guidance_scale=m.guidance_scale, batch_size=cfg.run.batch_size, negative_prompt=m.negative_prompt or None,
        pad_to_batch=cfg.run.batch_across_cells,
    )


def _cls(spec: PluginSpec):
    from .registries import REGISTRIES

    return REGISTRIES[spec.kind].get(spec.name)


def modifies_model(defense_cls: type[Defense]) -> bool:
    return defense_cls.location in (MarkLocation.MODEL_WEIGHTS, MarkLocation.VAE_DECODER)


def custom_generation(defense_cls: type[Defense]) -> bool:
    return defense_cls.generate is not Defense.generate


def resampled(defense_cls: type[Defense], attack_cls: type) -> bool:
    """True if the model attack samples with the standard sampler and the defence marks only at sampling time:
    the attacker's images are then the plain generation of the (released) model, not the defence's."""
    return defense_cls.location is MarkLocation.INITIAL_NOISE and getattr(attack_cls, "standard_sampling", False)


def white_box_generation(defense_cls: type[Defense]) -> bool:
    """A white-box defence that verifies through its own generation (WDM's trigger-fed extraction): its negatives
    are that same procedure on the clean model (attacked like the positives), not the clean model's plain images."""
    return defense_cls.verification is Verification.WHITE_BOX and custom_generation(defense_cls)


def twin_procedure(defense_cls: type[Defense]) -> bool:
    """Whether a defence's right twin is its own generation procedure run on the clean model (a trigger, a special
    sampler) rather than the clean model's ordinary images (post-hoc marks, plain generation, initial-noise marks
    whose clean counterpart has no key to draw from)."""
    return (defense_cls.location is not MarkLocation.POST_HOC and custom_generation(defense_cls)
            and defense_cls.has_paired_twin())


class _Builder:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.plan = Plan()
        self._run_data: dict[str, Any] | None = None
        self._named: dict[PluginSpec, dict[str, str]] = {}

    def add(self, kind: str, inputs: tuple[str, ...], plugin: PluginSpec | None = None, seed: int = 0,
            label: str = "", **extra: Any) -> str:
        if plugin is not None and kind != "detect":  # verifier-only parameters are keyed by detection alone
            plugin = plugin.embedding_spec()
        key = stable_hash({"kind": kind, "inputs": list(inputs), "plugin": plugin.identity() if plugin else None,
                           "seed": seed, "extra": extra})
        if key not in self.plan.stages:
            self.plan.stages[key] = Stage(kind, key, inputs, plugin, seed, label or kind,
                                          tuple(sorted(extra.items())))
        return key

    def base(self) -> str:
        return self.add("base", (), label="base model", model=model_fingerprint(self.cfg.model),
                        source=self.cfg.model.source)

    def request_identity(self, request: GenerationRequest) -> dict[str, Any]:
        return {"prompts": list(request.prompts), "seeds": list(request.seeds), "height": request.height,
                "width": request.width, "steps": request.num_inference_steps, "cfg": request.guidance_scale,
                "negative_prompt": request.negative_prompt, "device": self.cfg.run.device.split(":")[0],
                # the batch an image is sampled in changes its pixels (last bits of the float kernels): see
                # bench.generation; so it is part of what an image is, and of its key
                "batch_size": request.batch_size,
                # kernels that may round differently: in the key only when on, so existing keys stay valid
                **({"accel": {"channels_last": request.channels_last, "compile": request.compile}}
                   if request.channels_last or request.compile else {}),
                # every image in a batch of exactly batch_size (a padded last batch): other pixels where the last
                # batch would be short, so in the key when on (run.batch_across_cells)
                **({"padded": True} if request.pad_to_batch else {})}

    def run_data(self, spec: PluginSpec) -> dict[str, Any]:
        """What ``ctx.data`` shows a plugin of the run (prompts, image size): part of the key of those that read it."""
        if not getattr(_cls(spec), "uses_data", False):
            return {}
        if self._run_data is None:  # the prompt list may come from a file: read it once per plan
            self._run_data = {"prompts": self.cfg.prompt_list(), "height": self.cfg.model.height,
                              "width": self.cfg.model.width}
        return {"run_data": self._run_data}

    def attacked_model(self, model_key: str, ma: PluginSpec, seed: int, attack_seed: int = 0, embed: str = "",
                       defense: PluginSpec | None = None) -> str:
        """The model attack's stage on ``model_key``. A blind attack's key depends on nothing of the defence (it is
        shared by every defence); a ``method_known`` one also names the defence (``knows.method``); a
        ``trigger_known`` one also takes the defence's embedding as an input (its trigger is read from there). The
        clean model's branch gets the same knowledge, so that it is attacked the same way. Attack seed 0 adds
        nothing to the key: the attack run every config had before attack seeds existed."""
        if getattr(_cls(ma), "identity", False):
            return model_key
        tier = ThreatTier(getattr(_cls(ma), "tier", ThreatTier.BLIND))
        inputs: tuple[str, ...] = (model_key,)
        extra: dict[str, Any] = {"attack_seed": attack_seed} if attack_seed else {}
        if tier is not ThreatTier.BLIND and defense is not None:
            extra["knows"] = {"tier": tier.value, "method": defense.name}
            if tier.sees_trigger():
                inputs = (model_key, embed)
        if defense is not None and ma.instantiate().uses_second_marked_model():
            # a second release of the model, marked by the same defence with an independent key (another embed
            # stage: its own key, so its own random stream); the clean base for a defence that leaves the weights
            extra["second_marked"] = len(inputs)
            inputs = (*inputs, self.second_marked_model(defense, seed))
        return self.add("model_attack", inputs, ma, seed, label=f"model attack {ma.label}", **self.run_data(ma),
                        **self.named_models(ma), **extra)

    def second_marked_model(self, defense: PluginSpec, seed: int) -> str:
        """The model of a second, independent embedding of ``defense`` (another key), or the base model for a
        defence that does not change the weights."""
        base = self.base()
        if not modifies_model(_cls(defense)):
            return base
        return self.add("embed", (base,), defense, seed, label=f"embed {defense.label} (second release)",
                        **self.named_models(defense, "named_models"),
                        **self.run_data(defense), release=2)

    def plain_images(self, model_key: str, request: GenerationRequest, run_seed: int) -> str:
        return self.add("generate", (model_key,), None, 0, label="generate", request=self.request_identity(request),
                        run_seed=run_seed)

    def named_images(self, model_key: str, name: str, request: GenerationRequest, run_seed: int) -> str:
        """Plain generation of a named request (``Plan.named_requests[name]``) with a model."""
        self.plan.named_requests.setdefault(name, request)
        return self.add("generate", (model_key,), None, 0, label=f"generate {name.split('@')[0]}",
                        request=self.request_identity(request), run_seed=run_seed, request_name=name)

    def utility_images(self, ma: PluginSpec, model: str, clean_model: str, base: str, request: GenerationRequest,
                       seed: int) -> tuple[tuple[str, str], ...]:
        """The image sets the ``attacker_utility`` metric reads for a model-attacked cell (none for no attack):
        the attacked (watermarked) model's ordinary images and, for a downstream fine-tune with a recognisable
        task, the downstream captions' images of the attacked model, the equally attacked clean model and the
        unattacked base (the level before the attack)."""
        if getattr(_cls(ma), "identity", False) or not any(m.name == "attacker_utility" for m in self.cfg.metrics):
            return ()
        from .downstream import eval_captions, task_of

        out = [("ordinary_marked", self.plain_images(model, request, seed))]
        attack = ma.instantiate()
        task = task_of(attack.downstream_dataset(), attack.params.get("token"))
        if task is not None:
            name = f"downstream {task.dataset}@{seed}"
            dreq = self.plan.named_requests.get(name) or downstream_request(
                self.cfg, seed, eval_captions(task, self.cfg.run.num_images))
            out += [(role, self.named_images(m, name, dreq, seed))
                    for role, m in (("downstream_marked", model), ("downstream_clean", clean_model),
                                    ("downstream_base", base))]
        return tuple(out)

    def utility_losses(self, ma: PluginSpec, model: str, clean_model: str, base: str, start: str
                       ) -> tuple[tuple[str, str], ...]:
        """For the ``attacker_utility`` metric and a model attack with a downstream dataset (a world's task or a
        folder): the held-out denoising loss (:func:`bench.downstream.heldout_loss`) of the attacked watermarked
        model, the equally attacked clean model, the unattacked base and (``start``) the unattacked watermarked model,
        its value before the attack, one ``downstream_loss`` stage each, keyed by
        the model's stage key and the loss protocol (a stage kind of its own: no other stage's key changes, and a
        cached model is read, not retrained). Nothing for any other attack."""
        if getattr(_cls(ma), "identity", False) or not any(m.name == "attacker_utility" for m in self.cfg.metrics):
            return ()
        from .downstream import LOSS_PROTOCOL
        from .world import is_dataset_spec

        attack = ma.instantiate()
        dataset = attack.downstream_dataset()
        if not dataset:
            return ()
        protocol: dict[str, Any] = {"dataset": dataset, "n": self.cfg.run.num_images, "height": self.cfg.model.height,
                                    "width": self.cfg.model.width, **LOSS_PROTOCOL}
        if not is_dataset_spec(dataset):  # a folder: held out are the images after those the attack trains on
            p = attack.params
            protocol["skip"] = int(p.get("num_images", p.get("num_instance_images", 0)) or 0)
        return tuple((role, self.add("downstream_loss", (m,), None, 0, label=f"held-out loss {dataset}",
                                     protocol=protocol))
                     for role, m in (("heldout_loss_marked", model), ("heldout_loss_clean", clean_model),
                                     ("heldout_loss_base", base), ("heldout_loss_start", start)))

    def trigger_probe(self, d: PluginSpec, dcls: type[Defense], model: str, embed: str, request: GenerationRequest,
                      seed: int, variant: str) -> tuple[tuple[str, str], ...]:
        """For the ``trigger_specificity`` metric: the watermarked (attacked) model's images with random strings of
        the trigger's token length in the trigger's place, and the verifier's reading of them (a ``generate`` stage
        whose ``probe`` names the strings' count and images per string, then a ``detect`` stage). Only for the
        trigger row (variant ``""``) of a defence with a prompt trigger (:attr:`bench.Defense.prompt_trigger`);
        nothing (no stage, no key change) otherwise."""
        spec = next((m for m in self.cfg.metrics if m.name == "trigger_specificity"), None)
        if spec is None or variant != "" or not getattr(dcls, "prompt_trigger", False):
            return ()
        p = spec.param_dict
        probe = {"random_trigger": int(p["strings"]), "per_string": int(p["per_string"])}
        images = self.add("generate", (model, embed), d, seed, label=f"generate {d.label} (random triggers)",
                          request=self.request_identity(request), run_seed=seed, probe=probe)
        det = self.add("detect", (embed, images), d, seed, label=f"detect {d.label} (random triggers)")
        return (("random_trigger", det),)

    def attacked_images(self, images_key: str, ia: PluginSpec, seed: int, surrogate: str = "") -> str:
        if getattr(_cls(ia), "identity", False):
            return images_key
        inputs = (images_key, surrogate) if surrogate else (images_key,)
        return self.add("image_attack", inputs, ia, seed, label=f"image attack {ia.label}",
                        **self.attack_model(ia), **self.named_models(ia))

    def forged_images(self, clean_key: str, marked_key: str, ia: PluginSpec, seed: int, surrogate: str = "") -> str:
        """A forgery's stage: the clean images ``clean_key`` made to read as marked, the mark learnt from the
        marked images ``marked_key`` (a stage kind of its own, so no removal stage's key changes)."""
        inputs = (clean_key, marked_key) + ((surrogate,) if surrogate else ())
        return self.add("forge", inputs, ia, seed, label=f"forge {ia.label}", **self.attack_model(ia),
                        **self.named_models(ia))

    def surrogate(self, ia: PluginSpec, d: PluginSpec, dcls: type[Defense], model: str, clean_model: str, embed: str,
                  seed: int) -> str:
        """For an attack that trains a surrogate detector (``trains_surrogate``): the cached stage that trains it
        on images the attacker makes itself, with prompts of the run's set and seeds of their own: the watermarked
        model's images as it can get them (a post-hoc mark: the service's marked images; a sampling-time mark:
        the defence's generation; a trigger mark: the watermarked model's ordinary images, since the attacker
        does not know the trigger; a mark in the weights: the model's ordinary images) against the clean
        (equally model-attacked) model's ordinary images. Empty for every other attack (no stage, no key change)."""
        cls = _cls(ia)
        if not getattr(cls, "trains_surrogate", False):
            return ""
        n = int(ia.param_dict.get("train_images", 0))
        name = f"surrogate {n}@{seed}"
        request = self.plan.named_requests.get(name)
        if request is None:
            m = self.cfg.model
            prompts = self.cfg.prompt_list()
            request = GenerationRequest(
                prompts=tuple(prompts[i % len(prompts)] for i in range(n)),
                seeds=tuple(int(stable_hash(["surrogate-seed", seed, i])[:15], 16) for i in range(n)),
                height=m.height, width=m.width, num_inference_steps=m.num_inference_steps,
                guidance_scale=m.guidance_scale, batch_size=self.cfg.run.batch_size,
                negative_prompt=m.negative_prompt or None)
        clean = self.named_images(clean_model, name, request, seed)
        if dcls.location is MarkLocation.POST_HOC:
            marked = self.add("mark", (clean, embed), d, seed, label=f"mark {d.label} (attacker's images)")
        elif custom_generation(dcls) and not twin_procedure(dcls):
            marked = self.add("generate", (model, embed), d, seed, label=f"generate {d.label} (attacker's images)",
                              request=self.request_identity(request), run_seed=seed, request_name=name)
        else:
            marked = self.named_images(model, name, request, seed)
        # the surrogate depends on the training parameters only: one is shared by every attack setting that trains
        # it the same way (removal and forgery, every budget); the others are keyed at their defaults
        train = set(getattr(cls, "surrogate_params", ())) | {"train_images"}
        defaults = {p.name: p.default for p in cls.params}
        spec = dataclasses.replace(ia, params=tuple((k, v if k in train else defaults.get(k, v)) for k, v in ia.params),
                                   given=tuple(k for k in ia.given if k in train), display="")
        return self.add("surrogate", (marked, clean), spec, seed, label=f"train surrogate {ia.name}")

    def named_models(self, spec: PluginSpec, field: str = "attacker_models") -> dict[str, Any]:
        """The fingerprints of the models a plugin's parameters name (:meth:`bench.Plugin.named_models`: an
        attacker's own VAE, pipeline or CLIP; a defence's pre-trained extractor), part of its stage key under
        ``field``: rebuilt weights give new keys. A plugin that names none keeps its key. Computed once per plugin
        entry and plan (every cell's stage of that entry names the same weights)."""
        if spec not in self._named:
            try:
                named = spec.instantiate().named_models()
                self._named[spec] = {k: named_model_identity(kind, value, f"{spec.name}.{k}")
                                     for k, (kind, value) in sorted(named.items())}
            except Exception:  # bad input is refused by the preflight, in one sentence; a broken plugin fails its cells
                self._named[spec] = {}
        return {field: dict(self._named[spec])} if self._named[spec] else {}

    def attack_model(self, ia: PluginSpec) -> dict[str, Any]:
        """The model an image attack declares it needs (``needs_model``), by fingerprint: part of its stage key, so
        that another base model gives another key. Attacks that need none keep their keys."""
        needs = getattr(_cls(ia), "needs_model", None)
        if not needs:
            return {}
        return {"attack_model": {"needs": needs, "fingerprint": model_fingerprint(self.cfg.model)}}


#: how a repeated attack run is labelled: the model attack's label and `` a<attack seed>`` (reports.data parses it)
ATTACK_SEED_SUFFIX = " a{}"


def forges(ia: PluginSpec) -> bool:
    """Whether a configured image attack is a forgery (:attr:`bench.ImageAttack.forges`)."""
    cls = _cls(ia)
    return bool(getattr(cls, "can_forge", False)) and bool(ia.instantiate().forges)


def repeats_with_attack_seeds(ma: PluginSpec) -> bool:
    """Whether ``[run] attack_seeds`` repeats this model attack: every attack that trains on data (``uses_data``)."""
    cls = _cls(ma)
    return not getattr(cls, "identity", False) and bool(getattr(cls, "uses_data", False))


def attack_runs(cfg: BenchConfig) -> list[tuple[PluginSpec, int]]:
    """``(model attack, attack seed)`` for every attack run of the grid: a training attack once per
    ``run.attack_seeds`` (seed ``k`` > 0 labelled ``<label> a<k>``), any other attack once (attack seed 0)."""
    out = []
    for ma in cfg.model_attacks:
        seeds = cfg.run.attack_seeds if repeats_with_attack_seeds(ma) else [0]
        for k in seeds:
            out.append((ma if k == 0 else dataclasses.replace(ma, display=ma.label + ATTACK_SEED_SUFFIX.format(k)),
                        k))
    return out


def build_plan(cfg: BenchConfig) -> Plan:
    """Expand the config's grid into cells and stages (no model work; cheap)."""
    b = _Builder(cfg)
    base = b.base()
    attacked_negatives = cfg.negative_policy is NegativePolicy.ATTACKED
    for seed in cfg.run.seeds:
        request = generation_request(cfg, seed)
        b.plan.requests[seed] = request
        reference = b.plain_images(base, request, seed)
        for d in cfg.defenses:
            dcls = _cls(d)
            embed = b.add("embed", (base,), d, seed, label=f"embed {d.label}", **b.run_data(d),
                          **b.named_models(d, "named_models"))
            for ma, attack_seed in attack_runs(cfg):
                model = b.attacked_model(embed if modifies_model(dcls) else base, ma, seed, attack_seed, embed, d)
                clean_model = b.attacked_model(base, ma, seed, attack_seed, embed, d)
                clean_twins = b.plain_images(clean_model, request, seed)
                utility = b.utility_images(ma, model, clean_model, base, request, seed)
                losses = b.utility_losses(ma, model, clean_model, base, embed if modifies_model(dcls) else base)
                for variant in dcls.variants:
                    if dcls.location is MarkLocation.POST_HOC:
                        unattacked = b.add("mark", (clean_twins, embed), d, seed, label=f"mark {d.label}")
                    elif custom_generation(dcls) and not resampled(dcls, _cls(ma)):
                        unattacked = b.add("generate", (model, embed), d, seed,
                                           label=f"generate {d.label}" + (f"[{variant}]" if variant else ""),
                                           request=b.request_identity(request), run_seed=seed, variant=variant)
                    else:
                        unattacked = b.plain_images(model, request, seed)
                    if twin_procedure(dcls):
                        # the same generation on the clean weights (shared with a white-box defence's negatives)
                        twins = b.add("generate", (clean_model, embed), d, seed,
                                      label=f"generate {d.label} on the clean model"
                                      + (f"[{variant}]" if variant else ""),
                                      request=b.request_identity(request), run_seed=seed, variant=variant)
                    else:
                        twins = clean_twins
                    probes = b.trigger_probe(d, dcls, model, embed, request, seed, variant)
                    for ia in cfg.image_attacks:
                        surrogate = b.surrogate(ia, d, dcls, model, clean_model, embed, seed)
                        if forges(ia):
                            _forgery_cell(b, cfg, d, dcls, ma, ia, seed, embed, base, clean_model, clean_twins,
                                          unattacked, reference, twins, variant, surrogate)
                            continue
                        images = b.attacked_images(unattacked, ia, seed, surrogate)
                        if white_box_generation(dcls):
                            # a white-box verifier's null is its own procedure run on a clean model
                            negatives = b.add("generate", (clean_model if attacked_negatives else base, embed), d,
                                              seed, label=f"generate {d.label} on the clean model"
                                              + (f"[{variant}]" if variant else ""),
                                              request=b.request_identity(request), run_seed=seed, variant=variant)
                            negatives = (b.attacked_images(negatives, ia, seed, surrogate) if attacked_negatives
                                         else negatives)
                        elif attacked_negatives:
                            negatives = b.attacked_images(clean_twins, ia, seed, surrogate)
                        else:
                            negatives = b.plain_images(base, request, seed)
                        det_pos = b.add("detect", (embed, images), d, seed, label=f"detect {d.label}")
                        det_neg = b.add("detect", (embed, negatives), d, seed,
                                        label=f"detect {d.label} (negatives)")
                        key = stable_hash({
                            "cell": [det_pos, det_neg, images, unattacked, clean_twins, negatives, reference,
                                     twins, [list(u) for u in utility]],
                            "metrics": [m.identity() for m in cfg.metrics],
                            "target_fprs": list(cfg.run.target_fprs),
                            "negatives": cfg.run.negatives,
                            "variant": variant,
                            # in the key only when there is one, so that every other cell keeps its key
                            **({"probes": [list(p) for p in probes]} if probes else {}),
                            **({"losses": [list(v) for v in losses]} if losses else {}),
                        })
                        b.plan.cells.append(Cell(d, ma, ia, seed, key, embed, images, unattacked, clean_twins,
                                                 negatives, det_pos, det_neg, variant, reference, twins, utility,
                                                 extra_detections=probes, extra_values=losses))
    return b.plan


def _forgery_cell(b: _Builder, cfg: BenchConfig, d: PluginSpec, dcls: type[Defense], ma: PluginSpec, ia: PluginSpec,
                  seed: int, embed: str, base: str, clean_model: str, clean_twins: str, marked: str, reference: str,
                  twins: str, variant: str, surrogate: str = "") -> None:
    """A forgery cell: the clean images the verifier would see (the clean model's images; for a white-box
    verifier its own procedure on the clean model) are forged with what the attacker learns from the marked
    images, and detected; the negatives are the same clean images unforged. Its key names the axis, so no removal
    cell's key changes."""
    request = b.plan.requests[seed]
    if white_box_generation(dcls):
        clean = b.add("generate", (clean_model, embed), d, seed, label=f"generate {d.label} on the clean model"
                      + (f"[{variant}]" if variant else ""), request=b.request_identity(request), run_seed=seed,
                      variant=variant)
    else:
        clean = clean_twins
    images = b.forged_images(clean, marked, ia, seed, surrogate)
    det_pos = b.add("detect", (embed, images), d, seed, label=f"detect {d.label} (forged)")
    det_neg = b.add("detect", (embed, clean), d, seed, label=f"detect {d.label} (negatives)")
    key = stable_hash({
        "cell": [det_pos, det_neg, images, clean, clean_twins, clean, reference, twins],
        "metrics": [m.identity() for m in cfg.metrics],
        "target_fprs": list(cfg.run.target_fprs),
        "variant": variant,
        "axis": "forgery",
    })
    b.plan.cells.append(Cell(d, ma, ia, seed, key, embed, images, clean, clean_twins, clean, det_pos, det_neg,
                             variant, reference, twins, (), "forgery"))


def grid_cells(cfg: BenchConfig) -> dict[str, str]:
    """The cells of a config's grid now: label -> cell key (the key changes with any setting a cell depends on)."""
    return {c.label: c.key for c in build_plan(cfg).cells}


def grid_labels(cfg: BenchConfig) -> set[str]:
    """The labels (``defence/model attack/image attack/sN``) of the cells a config's grid has now. The readers of a
    results database (``bench show``, ``export``, ``report``, ``leaderboard``) keep only these, so that the cells an
    earlier version of the config left in the same output folder do not mix into its tables (``--all-cells`` keeps
    them). Labels, not cell keys: a run with an override that changes no label (``run.num_images``) is still read."""
    return set(grid_cells(cfg))
