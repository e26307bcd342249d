"""The four registries. Nothing here lists a plugin.

Built-ins are the classes decorated with ``@<registry>.register("name")`` in the built-in packages
(``defenses/``, ``attacks/``, ``bench/measures/``), found by a static scan (:mod:`bench.discovery`) without
importing them. Third-party plugins come from the entry-point groups ``bench.defenses``, ``bench.attacks`` (image
and model attacks alike: each class lands in the registry whose base class it subclasses) and ``bench.metrics``.
"""

from __future__ import annotations

from .discovery import builtin_plugins
from .plugins import Defense, ImageAttack, Metric, ModelAttack
from .registry import EntryPointGroup, Registry

_attacks_group = EntryPointGroup("bench.attacks")

defenses: Registry = Registry("defense", Defense, "bench.defenses",
                              builtins=lambda: builtin_plugins("defenses"))
image_attacks: Registry = Registry("image attack", ImageAttack, _attacks_group,
                                   builtins=lambda: builtin_plugins("image_attacks"))
model_attacks: Registry = Registry("model attack", ModelAttack, _attacks_group,
                                   builtins=lambda: builtin_plugins("model_attacks"))
metrics: Registry = Registry("metric", Metric, "bench.metrics",
                             builtins=lambda: builtin_plugins("metrics"))

REGISTRIES = {"defenses": defenses, "image_attacks": image_attacks, "model_attacks": model_attacks,
              "metrics": metrics}


def builtin_table(registry: str) -> dict[str, str]:
    """``{name: "module:attr"}`` of the built-ins of one registry (e.g. ``"image_attacks"``), from the scan."""
    return {f.name: f.target for f in builtin_plugins(registry)}


_TABLES = {"BUILTIN_DEFENSES": "defenses", "BUILTIN_IMAGE_ATTACKS": "image_attacks",
           "BUILTIN_MODEL_ATTACKS": "model_attacks", "BUILTIN_METRICS": "metrics"}


def __getattr__(name: str):
    """``BUILTIN_IMAGE_ATTACKS`` and its siblings, for code written when they were hand-kept tables: now read from
    the scan (nothing to add a line to)."""
    if name in _TABLES:
        return builtin_table(_TABLES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The marker of a result whose model attack assumes more than its threat model gives the attacker (a double
#: dagger; the dagger marks a cell outside its *defence's* threat model), and the legend line that explains it.
STRONGER_MARK = "\u2021"
STRONGER_LEGEND = (f"{STRONGER_MARK} the model attack assumes more than its threat model gives the attacker (its "
                   "declared beyond_threat_model, e.g. merge(other=base): the owner's clean base model, which an "
                   "attacker of released weights lacks); scored, but stronger than a realistic attack")


def exceeds_threat_model(model_attack: str, params) -> bool:
    """Whether the model attack ``model_attack`` with these resolved parameters assumes more than its threat model
    gives the attacker: its parameters match its declared :attr:`bench.ModelAttack.beyond_threat_model` (as
    :meth:`bench.ModelAttack.exceeds_threat_model` says of an instance). Read from the registry's record of the class
    (nothing is imported for a built-in); an unknown attack (a plugin not installed here) is not marked."""
    if not model_attack or model_attack not in model_attacks.names():
        return False
    beyond = dict(model_attacks.info(model_attack).extra).get("beyond_threat_model") or {}
    params = params or {}
    return bool(beyond) and all(params.get(k) == v for k, v in beyond.items())
