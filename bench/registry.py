"""One generic registry, instantiated per plugin kind.

Three ways in, one :meth:`Registry.register` (and therefore one validation) behind them all:

* **Built-ins** are found from their decorators by a static scan of the built-in packages
  (:mod:`bench.discovery`) and registered *lazily* as ``"module:attr"``: ``bench ls`` and ``bench --help`` import
  neither torch nor diffusers, and a new built-in is one decorated file.
* **Third-party plugins** come from the entry-point groups ``bench.defenses``, ``bench.attacks`` and
  ``bench.metrics``. One group may feed several registries (:class:`EntryPointGroup`): ``bench.attacks`` holds
  both kinds of attack, and each class lands in the registry whose base class it subclasses. Each is recorded with
  the distribution that provided it (``"acme-marks 2.0"``), also when its module decorates it too.
* **Decorators** in any imported module (``@image_attacks.register("mine")``).

A third-party entry point that fails to load or to validate never breaks a command: it is reported once as a
:class:`PluginLoadWarning` naming the package, left out of :meth:`Registry.names`, and only a config that names it
fails (a :class:`~bench.errors.ConfigError`, one sentence, exit code 2).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, TypeVar

from .errors import ConfigError, PluginValidationError
from .params import validate_declarations

T = TypeVar("T", bound=type)

#: The origin recorded for the plugins shipped with MarkBench.
BUILTIN_ORIGIN = "markbench"


class PluginLoadWarning(UserWarning):
    """A third-party plugin could not be loaded; it is left out and only configs that name it fail."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class Entry:
    name: str
    target: str | type  # "module:attr" until loaded, then the class
    origin: str | None  # "markbench" for built-ins, else the distribution (or module); None: not looked up yet
    info: Any = None  # bench.discovery.StaticInfo of a built-in, read without importing it

    @property
    def loaded(self) -> bool:
        return not isinstance(self.target, str)


@dataclass(frozen=True)
class PluginInfo:
    """What ``bench ls`` shows of one plugin."""

    name: str
    doc: str
    params: tuple
    origin: str
    extra: tuple = ()  # (attribute, value) pairs of bench.discovery.LISTED_ATTRS, e.g. (("threat", "api"),)


class EntryPointGroup:
    """One entry-point group and the registries it feeds; loaded once, on first use by any of them."""

    def __init__(self, name: str):
        self.name = name
        self.members: list[Registry] = []
        self.loaded = False

    def load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.name):
            origin = _dist_label(ep)
            where = f"entry point '{ep.name} = {ep.value}' of {origin} (group {self.name})"
            try:
                obj = ep.load()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of a third-party import (even
                # a sys.exit() at import) is contained
                self._broken(ep.name, where, f"could not be imported ({type(exc).__name__}: {exc})")
                continue
            fits = [r for r in self.members if isinstance(obj, type) and issubclass(obj, r.base)]
            if not fits:
                bases = " or ".join(f"{r.base.__module__}.{r.base.__name__}" for r in self.members)
                self._broken(ep.name, where, f"does not name a subclass of {bases}")
                continue
            try:
                fits[0]._register_entry_point(ep.name, obj, origin)
            except PluginValidationError as exc:
                self._broken(ep.name, where, f"was refused: {exc}", only=fits[0])

    def _broken(self, name: str, where: str, why: str, only: "Registry | None" = None) -> None:
        message = f"{where} {why}"
        warnings.warn(f"ignoring {message}", PluginLoadWarning, stacklevel=4)
        for reg in [only] if only is not None else self.members:
            reg._broken.setdefault(name, message)


def _dist_label(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return f"an unknown package ({ep.value})"
    return f"{dist.name} {dist.version}"


class Registry(Generic[T]):
    """A name -> plugin-class table for one kind of plugin (defences, image attacks, ...).

    >>> defenses = Registry("defense", base=Defense, entry_point_group="bench.defenses")
    >>> @defenses.register("mine")
    ... class Mine(Defense): ...

    ``builtins`` returns the built-ins found by :mod:`bench.discovery` (called once, on first use);
    ``entry_point_group`` is a group name or an :class:`EntryPointGroup` shared with other registries.
    """

    def __init__(self, kind: str, base: type, entry_point_group: "str | EntryPointGroup | None" = None,
                 accept: Callable[[type], bool] | None = None, *,
                 builtins: Callable[[], Iterable[Any]] | None = None):
        self.kind = kind
        self.base = base
        if isinstance(entry_point_group, str):
            entry_point_group = EntryPointGroup(entry_point_group)
        self.group = entry_point_group
        if self.group is not None:
            self.group.members.append(self)
        self.entry_point_group = self.group.name if self.group is not None else None
        self._accept = accept or (lambda cls: True)
        self._entries: dict[str, Entry] = {}
        self._broken: dict[str, str] = {}
        self._builtins = builtins
        self._builtins_loaded = builtins is None

    # -- registration -------------------------------------------------------------------------------
    def register(self, name: str, cls: type | None = None, *, origin: str | None = None):
        """Register ``cls`` under ``name``; usable as a decorator. Validates the class at once.

        ``origin`` defaults to ``"markbench"`` for a class in a built-in package, else to the installed
        distribution that holds its module (``"acme-marks 2.0"``), else to its module's name.
        """

        def deco(c: type) -> type:
            self._load_builtins()
            self._validate(name, c)
            existing = self._entries.get(name)
            if existing is not None and existing.target is not c and existing.target != _path_of(c):
                raise PluginValidationError(
                    f"{self.kind} '{name}' is already registered by {self._origin(existing)} "
                    f"({_describe_target(existing.target)}); refusing to overwrite it with "
                    f"{_path_of(c)} from {origin or _origin_of(c)}"
                )
            c.name = name
            keep = existing.origin if existing is not None and origin is None else None
            # the origin of a decorated class outside the built-ins is looked up when first asked for (it reads
            # every installed distribution's file list: about a second)
            self._entries[name] = Entry(name, c, keep or origin or _builtin_origin(c))
            return c

        return deco(cls) if cls is not None else deco

    def register_lazy(self, name: str, target: str, origin: str = BUILTIN_ORIGIN, info: Any = None) -> None:
        """Register a plugin by ``"module:attr"`` without importing it."""
        if name in self._entries:
            raise PluginValidationError(
                f"{self.kind} '{name}' is registered twice: {_describe_target(self._entries[name].target)} and "
                f"{target}")
        self._entries[name] = Entry(name, target, origin, info)

    def _register_entry_point(self, name: str, cls: type, origin: str) -> None:
        """An entry point's class: registered under the entry point's name, recorded with its distribution."""
        self._load_builtins()
        others = [e.name for e in self._entries.values() if e.target is cls and e.name != name]
        if others:
            raise PluginValidationError(
                f"the class {_path_of(cls)} is also registered as '{others[0]}' by its decorator; the entry point's "
                f"name must be the decorator's")
        existing = self._entries.get(name)
        if existing is not None and existing.target is cls:  # decorated in its own package, loaded by ep.load()
            existing.origin = origin
            return
        if existing is not None:
            raise PluginValidationError(
                f"{self.kind} '{name}' clashes with the one of the same name from {self._origin(existing)} "
                f"({_describe_target(existing.target)})")
        self.register(name, cls, origin=origin)

    def _validate(self, name: str, cls: type) -> None:
        owner = f"{self.kind} '{name}' ({_path_of(cls) if isinstance(cls, type) else repr(cls)})"
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise PluginValidationError(f"{owner} must be a subclass of {self.base.__module__}.{self.base.__name__}")
        if not self._accept(cls):
            raise PluginValidationError(f"{owner} is not a valid {self.kind} plugin")
        if not name or not all(ch.isalnum() or ch in "_-." for ch in name):
            raise PluginValidationError(f"{owner}: name {name!r} may only hold letters, digits, '_', '-', '.'")
        version = getattr(cls, "version", None)
        if not isinstance(version, str) or not version:
            raise PluginValidationError(f"{owner} must set a non-empty string class attribute 'version'")
        validate_declarations(owner, getattr(cls, "params", ()))
        verifier = [p.name for p in getattr(cls, "params", ()) if getattr(p, "verifier", False)]
        if verifier and self.kind != "defense":
            raise PluginValidationError(f"{owner}: parameter '{verifier[0]}' is declared verifier=True, which only a "
                                        "defence's parameter can be (it is read by the defence's detector alone)")
        check = getattr(cls, "validate_class", None)
        if check is not None:
            check(owner)

    # -- discovery ----------------------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for found in self._builtins():  # type: ignore[misc]
            existing = self._entries.get(found.name)
            if existing is not None and existing.loaded and _path_of(existing.target) == found.target:
                continue  # already imported and registered by its decorator
            if existing is not None:
                where = getattr(found, "path", "")
                raise PluginValidationError(
                    f"{self.kind} '{found.name}' is registered twice: {_describe_target(existing.target)} and "
                    f"{found.target}{f' ({where})' if where else ''}")
            self._entries[found.name] = Entry(found.name, found.target, BUILTIN_ORIGIN, found.info)

    def _load_all(self) -> None:
        self._load_builtins()
        if self.group is not None:
            self.group.load()

    # -- lookup -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every usable plugin name (third-party ones that failed to load are left out)."""
        self._load_all()
        return sorted(self._entries)

    def origin(self, name: str) -> str:
        """Where ``name`` comes from: ``"markbench"``, a distribution (``"acme-marks 2.0"``) or a module."""
        self._load_all()
        if name not in self._entries:
            self.get(name)
        return self._origin(self._entries[name])

    @staticmethod
    def _origin(entry: Entry) -> str:
        if entry.origin is None:
            entry.origin = _origin_of(entry.target) if entry.loaded else BUILTIN_ORIGIN  # type: ignore[arg-type]
        return entry.origin

    def get(self, name: str, where: str = "") -> T:
        """The plugin class for ``name``; an unknown (or broken) name raises a :class:`ConfigError`."""
        self._load_all()
        entry = self._entries.get(name)
        prefix = f"{where}: " if where else ""
        if entry is None:
            if name in self._broken:
                raise ConfigError(f"{prefix}{self.kind} '{name}' cannot be used: the {self._broken[name]}")
            avail = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(
                f"{prefix}unknown {self.kind} '{name}'{suggest(name, self._entries)}; available: {avail}"
            )
        if not entry.loaded:
            module, _, attr = str(entry.target).partition(":")
            mod = importlib.import_module(module)
            if not entry.loaded:  # the module's decorator did not register it (e.g. the scan misread it)
                cls: Any = mod
                for part in attr.split("."):
                    cls = getattr(cls, part)
                self._validate(name, cls)
                cls.name = name
                entry.target = cls
        return entry.target  # type: ignore[return-value]

    def info(self, name: str) -> PluginInfo:
        """Docstring, parameters and origin; a built-in is not imported when the scan could read them."""
        self._load_all()
        entry = self._entries.get(name)
        if entry is not None and not entry.loaded and entry.info is not None:
            return PluginInfo(name, entry.info.doc, tuple(entry.info.params), self._origin(entry),
                              tuple(getattr(entry.info, "extra", ())))
        cls = self.get(name)
        from .discovery import LISTED_ATTRS

        extra = tuple((a, getattr(getattr(cls, a), "value", getattr(cls, a))) for a in LISTED_ATTRS if hasattr(cls, a))
        return PluginInfo(name, inspect.cleandoc(cls.__doc__ or ""), tuple(cls.params), self.origin(name), extra)

    def broken(self) -> dict[str, str]:
        """Third-party names that failed to load, with why."""
        self._load_all()
        return dict(self._broken)

    def __contains__(self, name: str) -> bool:
        self._load_all()
        return name in self._entries

    def describe_lazy(self, name: str) -> str:
        self._load_all()
        return _describe_target(self._entries[name].target)


def _path_of(c: type) -> str:
    return f"{c.__module__}:{c.__qualname__}"


def _describe_target(t: str | type) -> str:
    return t if isinstance(t, str) else _path_of(t)


def _builtin_origin(cls: type) -> str | None:
    """``"markbench"`` for a class of the built-in packages, else None (to be looked up by :func:`_origin_of`)."""
    from .discovery import is_builtin_module

    return BUILTIN_ORIGIN if is_builtin_module(cls.__module__) else None


def _origin_of(cls: type) -> str:
    """``"markbench"`` for the built-in packages, else the installed distribution holding the class's module."""
    from .discovery import is_builtin_module

    module = cls.__module__
    if is_builtin_module(module):
        return BUILTIN_ORIGIN
    return _distribution_of(module) or module


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    from importlib import metadata

    try:
        return metadata.packages_distributions()
    except Exception:  # noqa: BLE001 - a broken installed distribution must not break registration
        return {}


@functools.lru_cache(maxsize=None)
def _distribution_of(module: str) -> str | None:
    import sys
    from importlib import metadata

    top = module.split(".")[0]
    mod = sys.modules.get(module)
    file = getattr(mod, "__file__", None)
    candidates = _packages_distributions().get(top, [])
    for dist_name in candidates:
        try:
            dist = metadata.distribution(dist_name)
            if file is not None:  # the module must really be that distribution's (not a same-named folder)
                root = Path(str(dist.locate_file(top))).resolve()
                if not Path(file).resolve().is_relative_to(root):
                    continue
            return f"{dist.metadata['Name']} {dist.version}"
        except Exception:  # noqa: BLE001
            continue
    return None
