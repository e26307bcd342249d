"""Declared plugin parameters.

A plugin declares each parameter once, as a typed class attribute (as a dataclass field is declared)::

    class HiDDeN(Defense):
        bits: int = param(30, "message length L (paper: 30 bits)", low=1, high=1024)
        lr_schedule: str = param("constant", "learning-rate schedule", choices=("constant", "cosine"))

from which the class's ``params`` tuple of :class:`Param` is generated at class creation (the annotation gives the
type; ``float | None`` makes it optional); an instance holds each value as that attribute, already of its declared
type, so the plugin needs no ``int()``/``float()`` casts. The older spelling ``params = (Param(...), ...)`` still
works for third-party plugins; a class may not use both. The declaration is checked when the plugin registers
(types, defaults inside their own ranges) and every value is checked when a config is loaded, so a bad value is
refused before any model loads, with the key, the value and what is allowed in one sentence. The resolved values
are recorded with every result (like diffusers' ``register_to_config``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import ConfigError, PluginValidationError

_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "str": (str,),
    "list[str]": (list,),
    "list[float]": (list,),
    "list[int]": (list,),
}


@dataclass(frozen=True)
class Param:
    """One declared parameter of a plugin.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``, ``list[str]``, ``list[int]``, ``list[float]``.
    ``low``/``high`` bound numbers (inclusive), ``choices`` bound strings. ``default=None`` with
    ``optional=True`` means "not set" (e.g. a ``strength`` that, when given, sets the natural parameter).
    ``keyed_at_default=False``: a parameter added to a plugin whose artifacts are already shipped; at its default it
    does not enter cache keys, so adding it changes no existing key.
    """

    name: str
    type: str
    default: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    #: False for a parameter added after artifacts keyed by its plugin were shipped: while it holds its default it
    #: is left out of cache keys (``PluginSpec.identity``), so those keys stand; it is still recorded with every
    #: result. A value other than the default is keyed as usual.
    keyed_at_default: bool = True
    #: True for a defence's *verifier-only* parameter: read by its detector alone (an inversion's settings, a
    #: detection score). It enters the detect stage's key, never the embed / generate / model-attack keys (there it
    #: is keyed at its declared default, :meth:`bench.config.PluginSpec.embedding_spec`), so two config entries that
    #: differ only in verifier parameters share one embedding and one set of images, read two ways.
    verifier: bool = False
    #: What kind of model the parameter's value names, if it names one the plugin loads besides the run's base model
    #: (``"vae"``: :func:`bench.models.vae_source`; ``"pipeline"``: :func:`bench.models.pipeline_source`; ``"clip"``:
    #: a CLIP scorer's name; ``"file"``: a weights file): the planner then keys the stage by a fingerprint of those
    #: weights (:func:`bench.models.named_model_identity`), not by the name alone, so rebuilt weights are never read
    #: from a stale cache. ``""``: a plain value. The value ``"base"`` names the run's base model, keyed already.
    names_model: str = ""

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        base = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(
            self.type, f"a {self.type}"
        )
        if self.low is not None and self.high is not None:
            base += f" in [{_fmt(self.low)}, {_fmt(self.high)}]"
        elif self.low is not None:
            base += f" >= {_fmt(self.low)}"
        elif self.high is not None:
            base += f" <= {_fmt(self.high)}"
        if self.optional:
            base += " (or unset)"
        return base

    def check(self, value: Any) -> Any:
        """Return the normalised value, or raise ``ValueError`` with what is allowed."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"must be {self.allowed()}")
        ok_types = _TYPES[self.type]
        if isinstance(value, bool) and self.type != "bool":
            raise ValueError(f"must be {self.allowed()}")
        if not isinstance(value, ok_types):
            raise ValueError(f"must be {self.allowed()}")
        if self.type == "float":
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"must be {self.allowed()}")
        if self.type.startswith("list["):
            inner = self.type[5:-1]
            inner_types = _TYPES[inner]
            if not all(isinstance(v, inner_types) and not isinstance(v, bool) for v in value):
                raise ValueError(f"must be {self.allowed()}")
            if self.choices is not None and not all(v in self.choices for v in value):
                raise ValueError(f"must contain only {', '.join(repr(c) for c in self.choices)}")
            if inner == "float":  # as a float parameter is: [1, 2] is [1.0, 2.0], and no NaN or infinity
                value = [float(v) for v in value]
                if not all(math.isfinite(v) for v in value):
                    raise ValueError(f"must be {self.allowed()} of finite numbers")
            return list(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be {self.allowed()}")
        if self.low is not None and value < self.low:
            raise ValueError(f"must be {self.allowed()}")
        if self.high is not None and value > self.high:
            raise ValueError(f"must be {self.allowed()}")
        return value


#: The kinds of model a parameter may name (:attr:`Param.names_model`).
MODEL_KINDS = ("vae", "pipeline", "clip", "file")


class Declared(Param):
    """What :func:`param` returns: a :class:`Param` still waiting for its name and type, which the class
    attribute it is assigned to gives (its name, its annotation)."""


def param(default: Any, doc: str = "", *, low: float | None = None, high: float | None = None,
          choices: Sequence[Any] | None = None, optional: bool = False, keyed_at_default: bool = True,
          verifier: bool = False, names_model: str = "") -> Any:
    """Declare a plugin parameter as a typed class attribute: ``steps: int = param(200, "optimiser steps", low=0)``.

    The type comes from the annotation (``int``, ``float``, ``bool``, ``str``, ``list[str]``, ``list[int]``,
    ``list[float]``; ``X | None`` makes it optional, i.e. ``None`` means "not set"). ``keyed_at_default=False``:
    see :class:`Param`. ``verifier=True`` (defences only): read by the detector alone, keyed by the detect stage
    only (see :class:`Param`). ``names_model``: the kind of model the value names (``"vae"``, ``"pipeline"``,
    ``"clip"``, ``"file"``), keyed by its weights' fingerprint (see :class:`Param`).
    """
    return Declared("", "", default, doc, low, high, tuple(choices) if choices is not None else None, optional,
                    keyed_at_default, verifier, names_model)


def annotation_type(annotation: Any) -> tuple[str, bool]:
    """``(type, optional)`` of a parameter's annotation (a string under ``from __future__ import annotations``, or
    the type itself); ``ValueError`` if it is not one of the declared types."""
    if isinstance(annotation, str):
        text = annotation
    elif isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        text = annotation.__name__
    else:
        text = str(annotation)
    text = text.replace("typing.", "").replace(" ", "")
    optional = False
    if text.startswith("Optional[") and text.endswith("]"):
        text, optional = text[len("Optional["):-1], True
    parts = text.split("|")
    if len(parts) == 2 and "None" in parts:
        text, optional = parts[0] if parts[1] == "None" else parts[1], True
    text = text.replace("List[", "list[")
    if text not in _TYPES:
        raise ValueError(f"the annotation {annotation!r} is not one of: {', '.join(_TYPES)} (or X | None)")
    return text, optional


def params_from_attributes(owner: str, namespace: Mapping[str, Any], annotations: Mapping[str, Any],
                           inherited: Sequence[Param] = ()) -> tuple[Param, ...]:
    """The ``params`` of a class that declares parameters as typed attributes (in the order written), after those
    it inherits (a redeclared name replaces the inherited one in place)."""
    own: list[Param] = []
    for name, d in namespace.items():
        if not isinstance(d, Declared):
            continue
        if name not in annotations:
            raise PluginValidationError(f"{owner}: parameter '{name}' needs a type annotation, e.g. "
                                        f"'{name}: int = param(...)'")
        try:
            typ, optional = annotation_type(annotations[name])
        except ValueError as exc:
            raise PluginValidationError(f"{owner}: parameter '{name}': {exc}") from None
        own.append(Param(name, typ, d.default, d.doc, d.low, d.high, d.choices, d.optional or optional,
                         d.keyed_at_default, d.verifier, d.names_model))
    by_name = {p.name: p for p in own}
    merged = [by_name.pop(p.name, p) for p in inherited]
    return tuple(merged) + tuple(p for p in own if p.name in by_name)


def _fmt(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def validate_declarations(owner: str, params: Sequence[Param]) -> None:
    """Check a plugin's parameter declarations; raise :class:`PluginValidationError` if they do not fit."""
    seen: set[str] = set()
    for p in params:
        if not isinstance(p, Param):
            raise PluginValidationError(f"{owner}: every entry of 'params' must be a bench.Param, got {p!r}")
        if p.name in seen:
            raise PluginValidationError(f"{owner}: parameter '{p.name}' is declared twice")
        if not p.name.isidentifier():
            raise PluginValidationError(f"{owner}: parameter name {p.name!r} is not a valid identifier")
        if p.name in ("name", "version"):
            raise PluginValidationError(f"{owner}: parameter name '{p.name}' is reserved")
        seen.add(p.name)
        if p.type not in _TYPES:
            raise PluginValidationError(
                f"{owner}: parameter '{p.name}' has type {p.type!r}; allowed types: {', '.join(_TYPES)}"
            )
        if p.low is not None and p.high is not None and p.low > p.high:
            raise PluginValidationError(f"{owner}: parameter '{p.name}' has low > high")
        if p.names_model and (p.names_model not in MODEL_KINDS or p.type != "str"):
            raise PluginValidationError(f"{owner}: parameter '{p.name}' has names_model={p.names_model!r}; a str "
                                        f"parameter may name one of: {', '.join(MODEL_KINDS)}")
        try:
            p.check(p.default)
        except ValueError as exc:
            raise PluginValidationError(
                f"{owner}: default {p.default!r} of parameter '{p.name}' is invalid: it {exc}"
            ) from None


def resolve_params(
    owner: str, declared: Sequence[Param], given: Mapping[str, Any], where: str = ""
) -> dict[str, Any]:
    """Merge ``given`` over the declared defaults, validating every value.

    ``where`` prefixes error messages (e.g. ``"bench.toml: defenses[1]"``) so the sentence names the file and
    key. Unknown keys are refused with the list of known ones.
    """
    from .registry import suggest

    by_name = {p.name: p for p in declared}
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            hint = suggest(key[:100], by_name)
            raise ConfigError(
                f"{where}{'.' if where else ''}{_cut(key)}: '{owner}' has no parameter '{_cut(key)}'"
                f"{hint}; its parameters are: {known}"
            )
        try:
            out[key] = by_name[key].check(value)
        except ValueError as exc:
            raise ConfigError(
                f"{where}{'.' if where else ''}{key} = {_cut(repr(value))} is invalid for '{owner}': "
                f"it {_cut(str(exc))}"
            ) from None
    for p in declared:
        if p.name not in out:  # a list default is copied: no instance can change the declaration
            out[p.name] = list(p.default) if isinstance(p.default, list) else p.default
    return out


@dataclass(frozen=True)
class ParamDoc:
    """Rendering helper for ``bench ls``."""

    name: str
    type: str
    default: Any
    allowed: str
    doc: str = field(default="")
    verifier: bool = False

    @property
    def line(self) -> str:
        """``name: type = default; allowed`` (``bench ls``), with ``[verifier only]`` for a verifier parameter."""
        return (f"{self.name}: {self.type} = {self.default!r}; {self.allowed}"
                + (" [verifier only]" if self.verifier else ""))


def describe(params: Sequence[Param]) -> list[ParamDoc]:
    return [ParamDoc(p.name, p.type, p.default, p.allowed(), p.doc, p.verifier) for p in params]


def _cut(text: str, limit: int = 80) -> str:
    """A value echoed in a message, at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
