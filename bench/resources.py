"""What one stage needs on a cluster worker (the ``resources`` of a Ray task): CPUs, GPUs, memory, custom resources.

Three layers, each over the one before:

1. the stage kind's default (:data:`KIND_DEFAULTS`): every stage one CPU; the stages that run the diffusion model
   (``embed``, ``model_attack``, ``generate``) also one GPU;
2. the plugin's class attribute ``resources`` (e.g. ``{"num_gpus": 0}`` for a one-pass weight edit such as pruning);
3. the config's ``[resources]`` table, keyed by stage kind (``generate``) or by kind and plugin
   (``"model_attack:lora"``; the plugin's name or its label), e.g. ``generate = {num_gpus = 0.5}`` packs two
   generations per GPU, ``"detect:hidden" = {num_gpus = 1}``, ``image_attack = {num_cpus = 2, memory = 4e9}``.

GPUs are asked for only when the run's device is a GPU (``run.device = "cuda"``): on a CPU run every stage is a CPU
stage whatever it declares. The in-process executor ignores all of this (it runs one stage at a time).
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError

STAGE_KINDS = ("embed", "model_attack", "generate", "mark", "image_attack", "forge", "surrogate", "detect",
               "downstream_loss")
KIND_DEFAULTS: dict[str, dict[str, float]] = {
    "embed": {"num_cpus": 1, "num_gpus": 1},
    "model_attack": {"num_cpus": 1, "num_gpus": 1},
    "generate": {"num_cpus": 1, "num_gpus": 1},
    "mark": {"num_cpus": 1},
    "image_attack": {"num_cpus": 1},
    "forge": {"num_cpus": 1},
    "surrogate": {"num_cpus": 1},
    "detect": {"num_cpus": 1},
    "downstream_loss": {"num_cpus": 1, "num_gpus": 1},
}
_KIND_OF_SECTION = {"embed": "defenses", "generate": "defenses", "mark": "defenses", "detect": "defenses",
                    "model_attack": "model_attacks", "image_attack": "image_attacks",
                    "forge": "image_attacks", "surrogate": "image_attacks"}


def parse_resources(table: Any, path: str) -> dict[str, dict[str, float]]:
    """Validate the config's ``[resources]`` table: ``{"kind" or "kind:plugin": {resource: amount >= 0}}``."""
    from .config import _k, _v  # echoed values cut to 80 characters

    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'resources' must be a table ([resources]), got {_v(table)}")
    out: dict[str, dict[str, float]] = {}
    for key, value in table.items():
        kind = key.split(":", 1)[0]
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{path}: resources.{_k(key)}: unknown stage kind {_v(kind)}; allowed: "
                              f"{', '.join(STAGE_KINDS)}, optionally followed by ':PLUGIN' (e.g. 'model_attack:lora')")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: resources.{_k(key)} = {_v(value)} is invalid: it must be a table such as "
                              f"{{num_cpus = 1, num_gpus = 1, memory = 4e9}}")
        for name, amount in value.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < float("inf"):
                raise ConfigError(f"{path}: resources.{_k(key)}.{_k(name)} = {_v(amount)} is invalid: it must be a "
                                  "finite number >= 0")
        out[key] = {name: float(amount) for name, amount in value.items()}
    return out


def stage_resources(stage, cfg) -> dict[str, float]:
    """The resources of ``stage`` (a :class:`bench.plan.Stage`) under ``cfg``: kind default < plugin < config."""
    res: dict[str, float] = dict(KIND_DEFAULTS.get(stage.kind, {"num_cpus": 1}))
    if stage.plugin is not None:
        from .registries import REGISTRIES

        res.update(getattr(REGISTRIES[stage.plugin.kind].get(stage.plugin.name), "resources", {}) or {})
    table: Mapping[str, Mapping[str, float]] = getattr(cfg, "resources", {}) or {}
    res.update(table.get(stage.kind, {}))
    if stage.plugin is not None:
        for name in dict.fromkeys((stage.plugin.name, stage.plugin.label)):
            res.update(table.get(f"{stage.kind}:{name}", {}))
    if not cfg.run.device.startswith("cuda"):
        res.pop("num_gpus", None)
    return {k: v for k, v in res.items() if v or k == "num_cpus"}
