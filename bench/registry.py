"""One generic registry, instantiated per plugin kind.

Built-in plugins are registered *lazily* as ``"module:attr"`` strings, so ``bench ls`` and ``bench --help``
import neither torch-heavy plugin modules nor diffusers. Third-party plugins come from the entry-point groups
``bench.defenses``, ``bench.attacks`` and ``bench.metrics``; they go through the same :meth:`Registry.register`
(and therefore the same validation) and are recorded with the distribution they came from.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

from .errors import ConfigError, PluginValidationError
from .params import validate_declarations

T = TypeVar("T", bound=type)


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class Entry:
    name: str
    target: str | type  # "module:attr" until loaded, then the class
    origin: str  # "markbench" for built-ins, else the distribution that provided it

    @property
    def loaded(self) -> bool:
        return not isinstance(self.target, str)


class Registry(Generic[T]):
    """A name -> plugin-class table for one kind of plugin (defences, image attacks, ...).

    >>> defenses = Registry("defense", base=Defense, entry_point_group="bench.defenses")
    >>> @defenses.register("mine")
    ... class Mine(Defense): ...
    """

    def __init__(self, kind: str, base: type, entry_point_group: str | None = None,
                 accept: Callable[[type], bool] | None = None):
        self.kind = kind
        self.base = base
        self.entry_point_group = entry_point_group
        self._accept = accept or (lambda cls: True)
        self._entries: dict[str, Entry] = {}
        self._entry_points_loaded = entry_point_group is None

    # -- registration -------------------------------------------------------------------------------
    def register(self, name: str, cls: type | None = None, *, origin: str = "markbench"):
        """Register ``cls`` under ``name``; usable as a decorator. Validates the class at once."""

        def deco(c: type) -> type:
            self._validate(name, c)
            existing = self._entries.get(name)
            if existing is not None and existing.target is not c and existing.target != _path_of(c):
                raise PluginValidationError(
                    f"{self.kind} '{name}' is already registered by {existing.origin} "
                    f"({_describe_target(existing.target)}); refusing to overwrite it with "
                    f"{_path_of(c)} from {origin}"
                )
            c.name = name
            self._entries[name] = Entry(name, c, origin if existing is None else existing.origin)
            return c

        return deco(cls) if cls is not None else deco

    def register_lazy(self, name: str, target: str, origin: str = "markbench") -> None:
        """Register a built-in by ``"module:attr"`` without importing it."""
        if name in self._entries:
            raise PluginValidationError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = Entry(name, target, origin)

    def _validate(self, name: str, cls: type) -> None:
        owner = f"{self.kind} '{name}' ({_path_of(cls)})"
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
        check = getattr(cls, "validate_class", None)
        if check is not None:
            check(owner)

    # -- lookup -------------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.entry_point_group):
            dist = getattr(ep, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
            if ep.name in self._entries and self._entries[ep.name].origin != "markbench":
                continue
            if ep.name in self._entries and _describe_target(self._entries[ep.name].target) == ep.value:
                continue  # the same class, already registered by its decorator
            if ep.name in self._entries:
                raise PluginValidationError(
                    f"{self.kind} '{ep.name}' from entry point {ep.value} ({origin}) clashes with the "
                    f"built-in of the same name"
                )
            self.register(ep.name, ep.load(), origin=origin)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def origin(self, name: str) -> str:
        self.get(name)
        return self._entries[name].origin

    def get(self, name: str, where: str = "") -> T:
        """The plugin class for ``name``; an unknown name raises a :class:`ConfigError` with suggestions."""
        self._load_entry_points()
        entry = self._entries.get(name)
        if entry is None:
            avail = ", ".join(sorted(self._entries)) or "none"
            prefix = f"{where}: " if where else ""
            raise ConfigError(
                f"{prefix}unknown {self.kind} '{name}'{suggest(name, self._entries)}; available: {avail}"
            )
        if not entry.loaded:
            module, _, attr = str(entry.target).partition(":")
            cls = getattr(importlib.import_module(module), attr)
            self._validate(name, cls)
            cls.name = name
            entry.target = cls
        return entry.target  # type: ignore[return-value]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries

    def describe_lazy(self, name: str) -> str:
        entry = self._entries[name]
        return _describe_target(entry.target)


def _path_of(c: type) -> str:
    return f"{c.__module__}:{c.__qualname__}"


def _describe_target(t: str | type) -> str:
    return t if isinstance(t, str) else _path_of(t)
