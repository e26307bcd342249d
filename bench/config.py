"""Typed configuration loaded from ``bench.toml``.

Precedence, said once: **command-line options > the config file > the defaults in these dataclasses**.

Everything is validated here, before any model loads: unknown sections or keys, wrong types, values out of range,
unknown plugins (with "did you mean"), a missing model folder, an unwritable output folder. Each problem is one
:class:`~bench.errors.ConfigError` sentence naming the file, the key, the value and what is allowed.

Plugin tables (``[[defenses]]``, ``[[image_attacks]]``, ``[[model_attacks]]``, ``[[metrics]]``) hold ``name`` and the
plugin's parameters. A list given for a scalar parameter is a *sweep*: it expands into one column per value (several
swept parameters expand to their product).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError
from .params import Param
from .plugins import NegativePolicy
from .registry import Registry, suggest

DEFAULT_CONFIG_NAME = "bench.toml"
#: a lone plugin entry's label shows its non-default parameters only up to this many
LABEL_MAX_CHANGED = 3


@dataclass(frozen=True)
class PluginSpec:
    """One configured plugin instance: registry kind, name, fully resolved parameters, version and origin."""

    kind: str
    name: str
    params: tuple[tuple[str, Any], ...]
    version: str
    origin: str = "markbench"
    given: tuple[str, ...] = ()  # the parameters the config set explicitly (shown in labels)
    display: str = ""  # a short label chosen in the config (``label = "..."``), else one is made from parameters

    @property
    def param_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}

    def instantiate(self):
        from . import registries

        return registries.REGISTRIES[self.kind].get(self.name)(**self.param_dict)

    def identity(self) -> dict[str, Any]:
        """What goes into cache keys: name, version and every resolved parameter, except those declared with
        ``keyed_at_default=False`` while they hold their default (added after the plugin's artifacts shipped)."""
        params = self.param_dict
        unkeyed = {p.name for p in _registry(self.kind).get(self.name).params
                   if not p.keyed_at_default and p.name in params and params[p.name] == p.default}
        return {"name": self.name, "version": self.version,
                "params": {k: v for k, v in params.items() if k not in unkeyed}}

    def embedding_spec(self) -> "PluginSpec":
        """This spec as every stage but detection sees it: its verifier-only parameters (``param(...,
        verifier=True)``) at their declared defaults, so that entries differing only in how they are read share
        the embed / generate / model-attack stages (and keep the keys those stages had before the parameters were
        declared verifier-only). ``self`` when it sets none of them otherwise."""
        declared = {p.name: p for p in _registry(self.kind).get(self.name).params if p.verifier}
        if not declared or all(v == declared[k].default for k, v in self.param_dict.items() if k in declared):
            return self
        params = tuple((k, _frozen(declared[k].default) if k in declared else v) for k, v in self.params)
        return replace(self, params=params, given=tuple(k for k in self.given if k not in declared))

    @property
    def label(self) -> str:
        if self.display:
            return self.display
        return self.short_label()

    def short_label(self, varying: frozenset[str] | set[str] = frozenset()) -> str:
        """The plugin's name and the parameters that vary in the grid (``varying``, among entries of this name) or,
        when there are at most :data:`LABEL_MAX_CHANGED` of them, the parameters that differ from the defaults. The
        full parameters are stored with every result."""
        cls = _registry(self.kind).get(self.name)
        defaults = {p.name: p.default for p in cls.params}
        params = self.param_dict
        changed = {k: v for k, v in params.items() if defaults.get(k) != v}
        if "strength" in changed:  # a strength sets the natural parameters: show only the strength
            changed = {"strength": changed["strength"]}
        if len(changed) > LABEL_MAX_CHANGED:
            changed = {}
        shown = set(changed) | {k for k in varying if k in params}
        if "strength" in shown:  # natural parameters derived from a swept strength vary with it: not shown
            shown = {k for k in shown if k == "strength" or k in self.given}
        changed = {k: params[k] for k in shown}
        if not changed:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_short(v)}" for k, v in sorted(changed.items())) + ")"


def _v(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters (a 10 MB value must not become a 10 MB message)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 1000:
        return f"<a {type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _k(key: str, limit: int = 80) -> str:
    """A key echoed in a message, cut to ``limit`` characters."""
    return key if len(key) <= limit else key[:limit] + f"... ({len(key)} characters)"


#: bounds on what a config may ask for (validation must not hang or allocate per image on absurd values)
MAX_NUM_IMAGES = 100_000
MAX_SEEDS = 1_000
MAX_BATCH_SIZE = 4_096
MAX_SIDE = 8_192
MAX_CELLS = 100_000
MAX_PROMPTS_FILE_BYTES = 64 * 2 ** 20
MAX_NAME = 100
#: the largest config file read (a grid is a few KB; a 300 MB file would only be parsed to be refused)
MAX_CONFIG_BYTES = 16 * 2 ** 20
#: the longest prompt accepted (CLIP reads 77 tokens; a megabyte-long line would only stall the tokenizer)
MAX_PROMPT_CHARS = 2_000
#: classifier-free guidance beyond this is no setting anyone samples with (and 1e308 overflows to NaN images)
MAX_GUIDANCE = 100.0


def _frozen(v: Any) -> Any:
    """A parameter value as a :class:`PluginSpec` holds it (a list as a tuple: the spec is hashable)."""
    return tuple(v) if isinstance(v, list) else v


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + "+".join(_short(x) for x in v) + "]"
    return str(v)


@dataclass
class RunConfig:
    name: str = "markbench"
    output: str = "runs/default"
    cache: str = ""  # artifact cache folder; empty: <output>/cache
    seeds: list[int] = field(default_factory=lambda: [0])
    #: each training model attack (one that reads data) is repeated with these seeds within every run seed (same
    #: key, embedding and images); seed 0 is the attack run every config has (its stage keys are unchanged)
    attack_seeds: list[int] = field(default_factory=lambda: [0])
    num_images: int = 16
    batch_size: int = 8
    negatives: str = "attacked"
    target_fprs: list[float] = field(default_factory=lambda: [1e-6, 1e-2])
    primary_metric: str = "tpr@1e-06"
    device: str = "cpu"
    include_identity: bool = True
    executor: str = "local"  # where stages run: "local" (this process) or "ray" (bench.ray_executor)
    address: str = ""  # the Ray cluster to join ("auto", "ray://host:10001"); empty: start a local Ray
    max_retries: int = 3  # Ray: how often a stage whose worker died is run again
    channels_last: bool = False  # generation: UNet and VAE in channels-last memory format (faster convs on GPUs)
    compile: bool = False  # generation: torch.compile the UNet (slow first call; worth it for long GPU runs)
    #: generation: sample every image in a batch of exactly batch_size (the last one padded) and fill the batches
    #: with the images of every cell that samples the same model with the same settings (bench.generation); an
    #: image's pixels then do not depend on what it ran beside, so merged and unmerged runs are bit-identical
    batch_across_cells: bool = False


@dataclass
class ModelConfig:
    builtin: str = ""
    path: str = ""
    hub_id: str = ""
    revision: str = "main"
    dtype: str = "float32"
    height: int = 64
    width: int = 64
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    allow_pickle: bool = False  # load pickle weights (.bin/.ckpt/.pt) of a folder or hub snapshot: they can run code

    @property
    def source(self) -> str:
        return self.builtin and f"builtin:{self.builtin}" or self.path or self.hub_id


@dataclass
class PromptConfig:
    """``set``: a world's prompt set, ``"<world>:<set>"`` (``tiny:heldout``; ``bench ls worlds``); ``file``: one prompt
    per line; ``list``: the prompts themselves. ``builtin`` is the legacy spelling of ``set`` (``"tiny"``)."""

    set: str = ""
    builtin: str = ""
    file: str = ""
    list: list[str] = field(default_factory=list)


@dataclass
class BenchConfig:
    path: str
    run: RunConfig
    model: ModelConfig
    prompts: PromptConfig
    defenses: list[PluginSpec]
    model_attacks: list[PluginSpec]
    image_attacks: list[PluginSpec]
    metrics: list[PluginSpec]
    raw: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # [resources]: see bench.resources

    @property
    def output(self) -> Path:
        return Path(self.run.output)

    @property
    def cache_dir(self) -> Path:
        return Path(self.run.cache) if self.run.cache else self.output / "cache"

    @property
    def negative_policy(self) -> NegativePolicy:
        return NegativePolicy(self.run.negatives)

    def prompt_list(self) -> list[str]:
        return load_prompts(self.prompts, self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "run": asdict(self.run),
            "model": asdict(self.model),
            "prompts": asdict(self.prompts),
            **{k: [s.identity() | {"origin": s.origin} for s in getattr(self, k)]
               for k in ("defenses", "model_attacks", "image_attacks", "metrics")},
        }


_SECTIONS = {"run": RunConfig, "model": ModelConfig, "prompts": PromptConfig}
_PLUGIN_SECTIONS = ("defenses", "model_attacks", "image_attacks", "metrics")
_ALLOWED_DTYPES = ("float32", "bfloat16", "float16")
_ALLOWED_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def _registry(kind: str) -> Registry:
    from . import registries

    return registries.REGISTRIES[kind]


def default_config_path() -> Path:
    """``./bench.toml`` if present, else the grid shipped next to the package."""
    local = Path(DEFAULT_CONFIG_NAME)
    if local.exists():
        return local
    return Path(__file__).resolve().parent.parent / DEFAULT_CONFIG_NAME


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                check_output: bool = True) -> BenchConfig:
    """Load, override (``{"run.num_images": 8}``) and validate a config file."""
    p = Path(path) if path is not None else default_config_path()
    if not p.exists():
        if p.is_symlink():
            raise ConfigError(f"{p}: is a broken or looping symbolic link, not a config file")
        raise ConfigError(f"{p}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a config file; name a TOML file such as {p / DEFAULT_CONFIG_NAME}")
    if not p.is_file():
        raise ConfigError(f"{p}: is not a regular file (a device, pipe or socket); name a TOML config file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: has {p.stat().st_size} bytes; a config file may have at most {MAX_CONFIG_BYTES}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file; a config must be TOML text") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, p)
    try:
        return parse_config(raw, str(p), check_output=check_output)
    except ConfigError as exc:
        if not overrides:
            raise
        given = ", ".join(f"{k}={_v(v)}" for k, v in overrides.items())
        raise ConfigError(f"{exc} (with --set {given})") from None


def _set_dotted(raw: dict, key: str, value: Any, path: Path) -> None:
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] in _PLUGIN_SECTIONS:
        _set_plugin_param(raw, key, parts[0], ".".join(parts[1:-1]), parts[-1], value, path)
        return
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise ConfigError(
            f"--set {key}: expected SECTION.KEY with SECTION one of {', '.join(_SECTIONS)} (e.g. run.num_images=8) "
            f"or PLUGINS.LABEL.PARAM with PLUGINS one of {', '.join(_PLUGIN_SECTIONS)} (e.g. "
            f"defenses.hidden.steps=100)"
        )
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: '{parts[0]}' must be a table ([{parts[0]}]), got {_v(section)}; "
                          f"so --set {_k(key)} cannot apply")
    section[parts[1]] = value


def _set_plugin_param(raw: dict, key: str, section: str, who: str, param: str, value: Any, path: Path) -> None:
    """``--set defenses.LABEL.PARAM=VALUE``: set a parameter of the [[defenses]] entries labelled ``LABEL``; where
    none has that label, of the unlabelled entries named ``LABEL`` (else of every entry so named). Validation then
    happens as for the file itself."""
    entries = raw.get(section)
    if not isinstance(entries, list):
        entries = []
    labels = [e.get("label") if isinstance(e, dict) else None for e in entries]
    names = [e if isinstance(e, str) else e.get("name") if isinstance(e, dict) else None for e in entries]
    named = [i for i, n in enumerate(names) if n == who]
    hits = [i for i, lab in enumerate(labels) if lab == who] or [i for i in named if not labels[i]] or named
    if not hits:
        have = sorted({str(lab or n) for lab, n in zip(labels, names) if (lab or n)})
        raise ConfigError(f"--set {key}: {path} has no {section} entry labelled or named {_v(who)}; "
                          f"it has: {', '.join(have) if have else 'none'}")
    if param in ("name", "label"):
        raise ConfigError(f"--set {key}: a plugin's '{param}' cannot be overridden; set one of its parameters")
    for i in hits:
        if isinstance(entries[i], str):
            entries[i] = {"name": entries[i]}
        entries[i][param] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE`` from the command line; VALUE is read as TOML (numbers, lists, booleans, strings)."""
    if "=" not in text:
        raise ConfigError(f"--set {_v(text)}: expected KEY=VALUE, e.g. run.num_images=8")
    key, _, value = text.partition("=")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string
    return key.strip(), parsed


def parse_config(raw: dict[str, Any], path: str = DEFAULT_CONFIG_NAME, check_output: bool = True) -> BenchConfig:
    known = set(_SECTIONS) | set(_PLUGIN_SECTIONS) | {"resources"}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{path}: unknown section {_v(key)}{suggest(key[:MAX_NAME], known)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
    sections = {name: _parse_section(raw.get(name, {}), cls, name, path) for name, cls in _SECTIONS.items()}
    run: RunConfig = sections["run"]
    model: ModelConfig = sections["model"]
    prompts: PromptConfig = sections["prompts"]
    _check_run(run, path)
    _check_model(model, path)
    _check_explicit_empty(raw.get("prompts", {}), "prompts", ("set", "builtin", "file", "list"), path)
    _check_prompts(prompts, path)

    specs = {kind: _parse_plugins(raw.get(kind), kind, path) for kind in _PLUGIN_SECTIONS}
    if not specs["defenses"]:
        raise ConfigError(f"{path}: defenses: at least one defence is needed, e.g. [[defenses]] name = \"dwtdct\"")
    if not specs["metrics"]:
        specs["metrics"] = _parse_plugins(["bit_accuracy", "tpr", "pvalue", "auc"], "metrics", path)
    if run.include_identity:
        for kind in ("model_attacks", "image_attacks"):
            if not any(_is_identity(s) for s in specs[kind]):
                specs[kind].insert(0, _spec(kind, "none", {}, f"{path}: {kind}"))
    for kind in ("model_attacks", "image_attacks"):
        if not specs[kind]:
            raise ConfigError(f"{path}: {kind}: the list is empty and run.include_identity is false")
    for kind in _PLUGIN_SECTIONS:
        seen: dict[str, int] = {}
        for i, s in enumerate(specs[kind]):
            ident = json.dumps(s.identity(), sort_keys=True)
            if ident in seen:
                raise ConfigError(f"{path}: {kind}: '{s.label}' is listed twice")
            seen[ident] = i
        specs[kind] = _grid_labels(specs[kind])
        by_label: dict[str, PluginSpec] = {}
        for s in specs[kind]:
            other = by_label.setdefault(s.label, s)
            if other is not s:
                raise ConfigError(f"{path}: {kind}: two entries have the label {_v(s.label)} ({other.name} and "
                                  f"{s.name}, with different parameters); labels must be distinct: set 'label' on one")
    n_cells = (len(run.seeds) * len(run.attack_seeds) * len(specs["defenses"]) * len(specs["model_attacks"])
               * len(specs["image_attacks"]))
    if n_cells > MAX_CELLS:
        raise ConfigError(f"{path}: the grid has {n_cells} cells (seeds x defences x model attacks x image attacks); "
                          f"at most {MAX_CELLS} are allowed: split it into several configs")
    _check_primary_metric(run, specs["metrics"], path)
    if isinstance(raw.get("run"), dict) and "primary_metric" in raw["run"]:  # the default ranks what it can
        _check_primary_metric_kind(run, specs["defenses"], path)
    cfg = BenchConfig(path, run, model, prompts, specs["defenses"], specs["model_attacks"],
                      specs["image_attacks"], specs["metrics"], raw, _resources(raw, specs, path))
    if check_output:
        check_output_writable(cfg)
    return cfg


def _grid_labels(specs: list[PluginSpec]) -> list[PluginSpec]:
    """Short labels: each unlabelled entry shows the parameters that vary among the entries of its plugin."""
    groups: dict[str, list[PluginSpec]] = {}
    for s in specs:
        if not s.display:
            groups.setdefault(s.name, []).append(s)
    varying: dict[str, set[str]] = {}
    for name, group in groups.items():
        keys = {k for s in group for k in s.param_dict}
        varying[name] = {k for k in keys if len({repr(s.param_dict.get(k)) for s in group}) > 1}
    return [s if s.display else replace(s, display=s.short_label(varying[s.name])) for s in specs]


def metric_outputs(metrics: list[PluginSpec], target_fprs: list[float]) -> set[str] | None:
    """The measurement names these metrics produce, or None if one of them does not declare its names."""
    names: set[str] = set()
    for spec in metrics:
        out = _registry(spec.kind).get(spec.name).outputs(spec.param_dict, tuple(target_fprs))
        if out is None:
            return None
        names.update(out)
    return names


_EMPIRICAL = re.compile(r"(tpr|fpr)@fpr<=\d+/\d+")


def shown_metric(primary: str, available: Sequence[str]) -> str | None:
    """What to rank or show when the run's primary metric is not among its results, which happens only with the
    default (``tpr@1e-06``, accepted unchecked) and defences without an analytic threshold (zero-bit marks report
    ``tpr@fpr<=k/N``): the same family at another operating point, else ``auc``, else ``bit_accuracy``, else None."""
    if primary in available:
        return primary
    family = primary.split("@")[0]
    for m in [m for m in available if m.startswith(family + "@")] + ["auc", "bit_accuracy"]:
        if m in available:
            return m
    return None


def _check_primary_metric(run: RunConfig, metrics: list[PluginSpec], path: str) -> None:
    known = metric_outputs(metrics, run.target_fprs)
    if known is None or run.primary_metric in known:
        return
    family = run.primary_metric.split("@")[0]
    if _EMPIRICAL.fullmatch(run.primary_metric) and f"{family}@{run.target_fprs[0]:g}" in known:
        return  # an empirical operating point (zero-bit defences): its k/N depends on the negatives, known at run time
    hint = suggest(run.primary_metric[:MAX_NAME], known)
    if "@" in run.primary_metric:  # the same FPR spelled otherwise: tpr@1e-04 is named tpr@0.0001
        try:
            fpr = float(run.primary_metric.split("@", 1)[1])
        except ValueError:
            fpr = None
        same = f"{family}@{fpr:g}" if fpr is not None else ""
        if same in known:
            hint = f" (did you mean {same!r}? an FPR is named in its shortest form)"
    raise ConfigError(f"{path}: run.primary_metric = {_v(run.primary_metric)} is not computed by this config's "
                      f"metrics{hint}; allowed: {', '.join(sorted(known))}")


_ANALYTIC = re.compile(r"(tpr|fpr)@[0-9.eE+-]+")


def _check_primary_metric_kind(run: RunConfig, defenses: list[PluginSpec], path: str) -> None:
    """An analytic operating point (``tpr@1e-06``) exists only for multi-bit defences: a zero-bit (score) defence
    has no analytic null, and reports ``tpr@fpr<=k/N`` at the FPR its negatives can resolve instead. A primary
    metric that no defence of the config (controls aside) can produce would leave every row of the leaderboard
    empty after the whole run."""
    if not _ANALYTIC.fullmatch(run.primary_metric):
        return
    from .plugins import DetectionKind

    marked = [s for s in defenses if s.name != "none"]
    kinds = {s.name: getattr(_registry(s.kind).get(s.name), "detection", None) for s in marked}
    if marked and all(k is DetectionKind.SCORE for k in kinds.values()):
        names = ", ".join(sorted(kinds))
        raise ConfigError(f"{path}: run.primary_metric = {_v(run.primary_metric)} is an analytic operating point, "
                          f"which the zero-bit defence(s) {names} do not have; allowed for them: 'auc', or "
                          f"'tpr@fpr<=k/N' (the empirical operating point their negatives resolve)")


def _is_identity(spec: PluginSpec) -> bool:
    return bool(getattr(_registry(spec.kind).get(spec.name), "identity", False))


def _parse_section(table: Any, cls: type, name: str, path: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: '{name}' must be a table ([{name}]), got {_v(table)}")
    by_name = {f.name: f for f in fields(cls)}
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in by_name:
            raise ConfigError(
                f"{path}: {name}.{_k(key)}: unknown key{suggest(key[:MAX_NAME], by_name)}; "
                f"allowed: {', '.join(by_name)}"
            )
        expected = getattr(defaults, key)
        values[key] = _check_type(value, expected, f"{path}: {name}.{key}")
    return replace(defaults, **values)


def _check_type(value: Any, expected: Any, where: str) -> Any:
    def bad(what: str):
        return ConfigError(f"{where} = {_v(value)} is invalid: it must be {what}")

    if isinstance(expected, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(expected, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
    elif isinstance(expected, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        value = float(value)
    elif isinstance(expected, str):
        if not isinstance(value, str):
            raise bad("a string")
    elif isinstance(expected, list):
        if not isinstance(value, list):
            raise bad("a list")
        if expected and isinstance(expected[0], float):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise bad("a list of numbers")
            value = [float(v) for v in value]
        elif expected and isinstance(expected[0], int):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise bad("a list of integers")
        elif not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
    return value


def _check_run(run: RunConfig, path: str) -> None:
    def bad(key: str, value: Any, allowed: str):
        return ConfigError(f"{path}: run.{key} = {_v(value)} is invalid: it must be {allowed}")

    if not 1 <= run.num_images <= MAX_NUM_IMAGES:
        raise bad("num_images", run.num_images, f"an integer in [1, {MAX_NUM_IMAGES}]")
    if not 1 <= run.batch_size <= MAX_BATCH_SIZE:
        raise bad("batch_size", run.batch_size, f"an integer in [1, {MAX_BATCH_SIZE}]")
    if not run.seeds or len(run.seeds) > MAX_SEEDS or len(set(run.seeds)) != len(run.seeds) or \
            any(not 0 <= s < 2 ** 63 for s in run.seeds):
        raise bad("seeds", run.seeds, f"a non-empty list of at most {MAX_SEEDS} distinct integers in [0, 2**63)")
    if not run.attack_seeds or len(run.attack_seeds) > MAX_SEEDS or \
            len(set(run.attack_seeds)) != len(run.attack_seeds) or \
            any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 63 for s in run.attack_seeds):
        raise bad("attack_seeds", run.attack_seeds,
                  f"a non-empty list of at most {MAX_SEEDS} distinct integers in [0, 2**63)")
    if run.negatives not in [p.value for p in NegativePolicy]:
        raise bad("negatives", run.negatives, "one of " + ", ".join(repr(p.value) for p in NegativePolicy))
    if not run.target_fprs or not all(0 < f < 1 for f in run.target_fprs) or \
            len(set(run.target_fprs)) != len(run.target_fprs):
        raise bad("target_fprs", run.target_fprs, "a non-empty list of distinct numbers in (0, 1)")
    if not _ALLOWED_DEVICE.match(run.device):
        raise bad("device", run.device, "'cpu', 'cuda', 'cuda:N' or 'mps'")
    if not run.output or "\0" in run.output:
        raise bad("output", run.output, "a folder path")
    if "\0" in run.cache:
        raise bad("cache", run.cache, "a folder path")
    if not run.primary_metric:
        raise bad("primary_metric", run.primary_metric, "the name of a measurement, e.g. 'tpr@1e-06'")
    _check_executor(run, path)


def _check_executor(run: RunConfig, path: str) -> None:
    from .executor import EXECUTORS, executor_available

    if run.executor not in EXECUTORS:
        raise ConfigError(f"{path}: run.executor = {run.executor!r} is invalid{suggest(run.executor, EXECUTORS)}: "
                          f"it must be one of {', '.join(repr(e) for e in EXECUTORS)}")
    missing = executor_available(run.executor)
    if missing:
        raise ConfigError(f"{path}: run.executor = {run.executor!r} {missing}")
    if run.address and run.executor != "ray":
        raise ConfigError(f"{path}: run.address = {run.address!r} is only used with run.executor = 'ray' "
                          f"(--executor ray)")
    if run.max_retries < 0:
        raise ConfigError(f"{path}: run.max_retries = {run.max_retries!r} is invalid: it must be an integer >= 0")


def _resources(raw: dict[str, Any], specs: dict[str, list[PluginSpec]], path: str) -> dict[str, dict[str, float]]:
    from .resources import _KIND_OF_SECTION, parse_resources

    table = parse_resources(raw.get("resources", {}), path)
    for key in table:
        kind, _, who = key.partition(":")
        section = _KIND_OF_SECTION[kind]
        names = {n for s in specs[section] for n in (s.name, s.label)}
        if who and who not in names:
            raise ConfigError(f"{path}: resources.{key}: no {section} entry is named or labelled {who!r}"
                              f"{suggest(who, names)}; configured: {', '.join(sorted(names))}")
    return table


def _check_model(model: ModelConfig, path: str) -> None:
    given = [k for k in ("builtin", "path", "hub_id") if getattr(model, k)]
    if len(given) != 1:
        raise ConfigError(
            f"{path}: model: set exactly one of model.builtin, model.path or model.hub_id "
            f"(got {', '.join(given) or 'none'})"
        )
    if model.builtin:
        from .world import model_names

        names = model_names()
        if model.builtin not in names:
            raise ConfigError(
                f"{path}: model.builtin = {_v(model.builtin)} is unknown"
                f"{suggest(model.builtin[:MAX_NAME], names)}; available: {', '.join(sorted(names))}"
            )
    if model.path:
        folder = _resolve(model.path, path)
        if "\0" in model.path or not folder.is_dir():
            raise ConfigError(f"{path}: model.path = {_v(model.path)}: no such folder")
        if not (folder / "model_index.json").exists():
            raise ConfigError(
                f"{path}: model.path = {_v(model.path)} is not a diffusers pipeline folder (no model_index.json)"
            )
        from .modelcheck import check_pipeline_folder

        check_pipeline_folder(folder, f"{path}: model.path = {_v(model.path)}", model.allow_pickle)
    if model.hub_id and not re.match(r"^[\w.-]+/[\w.-]+$", model.hub_id):
        raise ConfigError(f"{path}: model.hub_id = {_v(model.hub_id)} is invalid: it must look like 'org/name'")
    if model.dtype not in _ALLOWED_DTYPES:
        raise ConfigError(f"{path}: model.dtype = {_v(model.dtype)} is invalid: it must be one of "
                          + ", ".join(repr(d) for d in _ALLOWED_DTYPES))
    for key in ("height", "width"):
        v = getattr(model, key)
        if v < 8 or v % 8 or v > MAX_SIDE:
            raise ConfigError(f"{path}: model.{key} = {_v(v)} is invalid: it must be a multiple of 8 in "
                              f"[8, {MAX_SIDE}]")
    if model.num_inference_steps < 1 or model.num_inference_steps > 1000:
        raise ConfigError(f"{path}: model.num_inference_steps = {_v(model.num_inference_steps)} is invalid: "
                          "it must be an integer in [1, 1000]")
    if len(model.negative_prompt) > MAX_PROMPT_CHARS:  # as a prompt: a huge one stalls the tokenizer
        raise ConfigError(f"{path}: model.negative_prompt has {len(model.negative_prompt)} characters; a prompt may "
                          f"have at most {MAX_PROMPT_CHARS}")
    if not 0 <= model.guidance_scale <= MAX_GUIDANCE:  # NaN fails both comparisons
        raise ConfigError(f"{path}: model.guidance_scale = {_v(model.guidance_scale)} is invalid: it must be a "
                          f"number in [0, {MAX_GUIDANCE:g}]")


def _check_explicit_empty(table: dict, section: str, keys: tuple[str, ...], path: str) -> None:
    """Keys written only with empty values (``list = []``, ``file = ""``) are a mistake, not "use the default": say so
    instead of silently running the default. (Emptying one key while setting another, ``--set prompts.set=
    --set prompts.file=x``, is how a key is cleared on the command line, and is fine.)"""
    given = [k for k in keys if k in table]
    if given and all(table[k] in ("", []) for k in given):
        k = given[0]
        raise ConfigError(f"{path}: {section}.{k} = {_v(table[k])} is empty; give a value, or remove the key to use "
                          f"the default")


def _check_prompts(prompts: PromptConfig, path: str) -> None:
    given = [k for k in ("set", "builtin", "file", "list") if getattr(prompts, k)]
    if len(given) > 1:
        raise ConfigError(f"{path}: prompts: set only one of prompts.set, prompts.file or prompts.list "
                          f"(got {', '.join(given)})")
    for key in ("set", "builtin"):
        spec = getattr(prompts, key)
        if spec:
            from .errors import UserError
            from .world import load_prompt_set

            try:
                load_prompt_set(spec if key == "set" else f"builtin:{spec}")
            except UserError as exc:
                raise ConfigError(f"{path}: prompts.{key} = {_v(spec)}: {exc}") from None
    if prompts.file:
        f = _resolve(prompts.file, path)
        if "\0" in prompts.file or not f.exists():
            what = "is a broken or looping symbolic link" if "\0" not in prompts.file and f.is_symlink() \
                else ": no such file"
            raise ConfigError(f"{path}: prompts.file = {_v(prompts.file)}{' ' if what[0] != ':' else ''}{what}")
        if not f.is_file():
            what = "is a folder" if f.is_dir() else "is not a regular file (a device, pipe or socket)"
            raise ConfigError(f"{path}: prompts.file = {_v(prompts.file)} {what}; it must be a text file "
                              "with one prompt per line")
        if f.stat().st_size > MAX_PROMPTS_FILE_BYTES:
            raise ConfigError(f"{path}: prompts.file = {_v(prompts.file)} has {f.stat().st_size} bytes; a prompts "
                              f"file may have at most {MAX_PROMPTS_FILE_BYTES} bytes")
    if any(not p.strip() for p in prompts.list):
        raise ConfigError(f"{path}: prompts.list holds an empty prompt; every prompt must be non-empty text")
    _check_prompt_lengths(prompts.list, f"{path}: prompts.list")


def _check_prompt_lengths(prompts: list[str], where: str) -> None:
    for i, p in enumerate(prompts):
        if len(p) > MAX_PROMPT_CHARS:
            raise ConfigError(f"{where}: prompt {i + 1} has {len(p)} characters ({_v(p, 40)}); a prompt may have at "
                              f"most {MAX_PROMPT_CHARS}")


def _resolve(p: str, config_path: str) -> Path:
    """Relative paths in a config file are relative to the current folder (like the CLI's own options)."""
    return Path(os.path.expanduser(p))


#: the prompts of a config that names none (the micro world's 64 captions)
DEFAULT_PROMPT_SET = "micro:shapes"


def load_prompts(prompts: PromptConfig, path: str = "") -> list[str]:
    if prompts.list:
        return list(prompts.list)
    if prompts.file:
        try:
            text = _resolve(prompts.file, path).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: prompts.file = {_v(prompts.file)} is not UTF-8 text; it must be a text file "
                              "with one prompt per line") from None
        except OSError as exc:
            raise ConfigError(f"{path}: prompts.file = {_v(prompts.file)} cannot be read "
                              f"({exc.strerror or type(exc).__name__})") from None
        if "\0" in text:
            raise ConfigError(f"{path}: prompts.file = {_v(prompts.file)} is binary (it holds NUL bytes); it must be "
                              "a text file with one prompt per line")
        lines = [ln.strip() for ln in text.splitlines()]
        out = [ln for ln in lines if ln and not ln.startswith("#")]
        if not out:
            raise ConfigError(f"{path}: prompts.file = {_v(prompts.file)} holds no prompts")
        _check_prompt_lengths(out, f"{path}: prompts.file = {_v(prompts.file)}")
        return out
    from .world import load_prompt_set

    if prompts.builtin:
        return load_prompt_set(f"builtin:{prompts.builtin}")
    return load_prompt_set(prompts.set or DEFAULT_PROMPT_SET)


def _parse_plugins(entries: Any, kind: str, path: str) -> list[PluginSpec]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: {kind} must be a list of tables ([[{kind}]]) or of names, got {_v(entries)}")
    out: list[PluginSpec] = []
    for i, entry in enumerate(entries):
        where = f"{path}: {kind}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table with a 'name' or a plugin name, got {_v(entry)}")
        entry = dict(entry)
        entry_given = set(entry)
        name = entry.pop("name", None)
        label = entry.pop("label", "")
        if name is None:
            raise ConfigError(f"{where}: 'name' is missing (it must be a string naming a {kind[:-1]} plugin)")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name = {_v(name)} is invalid: it must be a string naming a {kind[:-1]} plugin "
                              f"(bench ls {kind.replace('_', '-')})")
        if len(name) > MAX_NAME or not name.isprintable():
            raise ConfigError(f"{where}.name = {_v(name)} is not a plugin name (names are short printable words; "
                              f"bench ls {kind.replace('_', '-')} lists them)")
        if "label" in entry_given and (not isinstance(label, str) or not label or len(label) > MAX_NAME
                                       or not re.fullmatch(r"[\w.+=,()\[\]-]+", label)):
            raise ConfigError(f"{where}.label = {_v(label)} is invalid: it must be a name of 1 to {MAX_NAME} letters, "
                              "digits and _ . + = , ( ) [ ] -")
        cls = _registry(kind).get(name, where=f"{where}.name")
        if "from" in entry:
            entry = {**_entry_from(entry.pop("from"), kind, name, label, path, where), **entry}
        n_combos = 1
        for key, value in entry.items():
            if isinstance(value, list):
                n_combos *= max(len(value), 1)
        if n_combos > MAX_CELLS:
            raise ConfigError(f"{where}: the sweep expands to {n_combos} entries; at most {MAX_CELLS} are allowed")
        combos = _expand_sweep(cls.params, entry, where)
        swept = [k for k, v in entry.items() if len({repr(c[k]) for c in combos}) > 1]
        for combo in combos:
            spec = _spec(kind, name, combo, where)
            if label:
                suffix = ",".join(f"{k}={_short(combo[k])}" for k in swept)
                spec = replace(spec, display=label + (f"({suffix})" if suffix else ""))
            out.append(spec)
    return out


def _entry_from(src: Any, kind: str, name: str, label: str, path: str, where: str) -> dict[str, Any]:
    """The parameters of the ``[[kind]]`` entry named ``name`` (and ``label``, if given) in another config file.

    ``from = "configs/sleepermark-tiny.toml"`` shares one defence's settings between configs, so that they share its
    cache key too (and a shipped pre-embedded model). The path is taken relative to this config's folder, else to the
    current folder; keys given beside ``from`` override the borrowed ones.
    """
    if not isinstance(src, str) or not src:
        raise ConfigError(f"{where}.from = {_v(src)} is invalid: it must be the path of another config file")
    here = Path(path).parent if path else Path(".")
    candidates = [here / src, Path(os.path.expanduser(src))]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise ConfigError(f"{where}.from = {_v(src)}: no such file (looked in {here} and the current folder)")
    try:
        other = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}.from = {_v(src)}: {file} is not valid TOML ({exc})") from None
    matches = [dict(e) for e in other.get(kind, []) if isinstance(e, dict) and e.get("name") == name
               and (not label or e.get("label", "") in ("", label))]
    if len(matches) != 1:
        raise ConfigError(f"{where}.from = {_v(src)}: {file} has {len(matches)} [[{kind}]] entries named {_v(name)}"
                          + (f" with label {_v(label)}" if label else "") + "; exactly one is needed")
    entry = matches[0]
    entry.pop("name", None)
    entry.pop("label", None)
    if "from" in entry:
        raise ConfigError(f"{where}.from = {_v(src)}: that entry borrows from another file itself; point at the source")
    return entry


def _expand_sweep(declared, entry: dict[str, Any], where: str) -> list[dict[str, Any]]:
    by_name: dict[str, Param] = {p.name: p for p in declared}
    axes: list[list[tuple[str, Any]]] = []
    for key, value in entry.items():
        p = by_name.get(key)
        sweep = isinstance(value, list) and (
            p is None or not p.type.startswith("list[") or (value and all(isinstance(v, list) for v in value))
        )
        if sweep:
            if not value:
                raise ConfigError(f"{where}.{key} = []: a sweep needs at least one value")
            axes.append([(key, v) for v in value])
        else:
            axes.append([(key, value)])
    return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def _spec(kind: str, name: str, given: dict[str, Any], where: str) -> PluginSpec:
    from .params import resolve_params

    reg = _registry(kind)
    cls = reg.get(name, where=where)
    if "strength" in given and given.get("strength") is not None:
        # only the parameters strength sets clash with it (an attack's other settings, e.g. rinse's passes, do not)
        mapped = cls.natural_params(0.5) if kind == "image_attacks" else {}
        natural = [k for k in given if k != "strength" and k in mapped]
        if natural and kind == "image_attacks":
            raise ConfigError(
                f"{where}: set either 'strength' or the natural parameter(s) {', '.join(natural)} of '{name}', not both"
            )
    resolved = resolve_params(name, cls.params, given, where=where)
    if kind == "image_attacks" and resolved.get("strength") is not None:
        resolved.update(cls.natural_params(resolved["strength"]))
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in resolved.items()))
    return PluginSpec(kind, name, frozen, cls.version, reg.origin(name), tuple(sorted(given)))


def check_output_writable(cfg: BenchConfig) -> None:
    """The output and cache folders exist or can be created, and can be written (checked by creating them and a
    probe file; folders this check made are removed again)."""
    import tempfile

    for folder, key in ((cfg.output, "run.output"), (cfg.cache_dir, "run.cache")):
        shown = _v(str(folder))
        probe = folder
        while not probe.exists() and probe != probe.parent:
            if probe.is_symlink():
                raise ConfigError(f"{cfg.path}: {key} = {shown} is not writable ({probe} is a broken or looping "
                                  "symbolic link); it must be a folder that exists or can be created")
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise ConfigError(f"{cfg.path}: {key} = {shown} is not writable ({probe} is not a folder); it must be "
                              "a folder that exists or can be created")
        made: list[Path] = []
        try:
            p = folder
            missing = []
            while not p.exists() and p != p.parent:
                missing.append(p)
                p = p.parent
            for m in reversed(missing):
                m.mkdir()
                made.append(m)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
                pass
        except OSError as exc:
            raise ConfigError(f"{cfg.path}: {key} = {shown} is not writable: it cannot be created or written "
                              f"({exc.strerror or type(exc).__name__}); it must be a writable folder") from None
        finally:
            for m in reversed(made):
                try:
                    m.rmdir()
                except OSError:
                    pass
