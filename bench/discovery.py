"""Built-in plugins found from their decorators, without importing them.

The decorator is the one source of truth for a built-in's name: :func:`scan` reads the source of every module in
the built-in plugin packages (:data:`BUILTIN_PACKAGES`) with :mod:`ast` and records each
``@<registry>.register("name")`` on a class as a lazy ``"module:attr"`` target. Adding a built-in is therefore one
decorated file; nothing else lists it. Nothing is imported, so ``bench ls`` and ``bench --help`` stay free of torch.

The scan also reads what ``bench ls`` prints (the docstring, ``version``, the declared ``params``) where the source
states it plainly (literals, ``Param(...)`` calls, module constants, class attributes in the same module); a
plugin whose declaration needs running code is imported when listed. ``tests/test_discovery.py`` checks that the
static reading equals the imported class for every built-in.

A scan of the ~40 built-in modules takes a few tens of milliseconds, so it is not cached: adding or editing a
file is seen by the next command.
"""

from __future__ import annotations

import ast
import enum
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

#: Packages whose modules hold the built-in plugins (searched recursively). The registry each plugin lands in is
#: the one its decorator names, not the folder.
BUILTIN_PACKAGES: tuple[str, ...] = ("markbench.defenses", "markbench.attacks", "markbench.measures",
                                     "markbench.worlds")

#: The registries a decorator may name: the attribute names in :mod:`bench.registries` (and :mod:`bench`), and
#: :data:`bench.world.worlds`.
REGISTRY_NAMES: tuple[str, ...] = ("defenses", "image_attacks", "model_attacks", "metrics", "worlds")


@dataclass(frozen=True)
class StaticInfo:
    """What ``bench ls`` shows of a plugin, read from its source."""

    doc: str
    version: str
    params: tuple  # tuple[bench.Param, ...]
    #: the class attributes of :data:`LISTED_ATTRS` the source states plainly, e.g. ``(("threat", "api"),)``
    extra: tuple = ()


#: class attributes ``bench ls`` shows besides docstring and parameters (a defence's threat setting; what a model
#: attack assumes the attacker has, its goal, when it exceeds the threat model)
LISTED_ATTRS: tuple[str, ...] = ("threat", "attacker_has", "goal", "beyond_threat_model", "identity", "tier",
                                 "serves_prompts")


@dataclass(frozen=True)
class Found:
    """One ``@<registry>.register("name")`` decorator found in a built-in module."""

    registry: str
    name: str
    target: str  # "module:qualname"
    path: str
    line: int
    info: StaticInfo | None = None


@dataclass
class ScanResult:
    found: list[Found] = field(default_factory=list)
    #: ``register`` calls the scan could not read (a non-literal name, a class inside a function): each is
    #: ``"path:line: why"``. Built-ins must have none (a test checks).
    unreadable: list[str] = field(default_factory=list)


def package_dirs(package: str) -> list[str]:
    """The folders of ``package`` without importing it (its parents are imported if dotted)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [str(p) for p in spec.submodule_search_locations]


def _module_files(package: str) -> Iterable[tuple[str, str]]:
    """``(module name, path)`` of every ``.py`` file under ``package``."""
    for root in package_dirs(package):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(dirpath, root)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                mod = prefix if fn == "__init__.py" else f"{prefix}.{fn[:-3]}"
                yield mod, os.path.join(dirpath, fn)


def scan(packages: Iterable[str] = BUILTIN_PACKAGES) -> ScanResult:
    """Every registry decorator in the modules of ``packages``."""
    result = ScanResult()
    for package in packages:
        for module, path in _module_files(package):
            try:
                with open(path, encoding="utf-8") as fh:
                    source = fh.read()
            except OSError:
                continue
            if ".register(" not in source:
                continue
            try:
                tree = ast.parse(source, filename=path)
            except SyntaxError as exc:
                result.unreadable.append(f"{path}:{exc.lineno}: syntax error ({exc.msg})")
                continue
            _scan_module(tree, module, path, result)
    return result


# -------------------------------------------------------------------------------------------------------------
# One module
# -------------------------------------------------------------------------------------------------------------
def _module_level(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """The statements that run at import: the module's, and those inside its if/try/with blocks."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for part in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, part, []) or [])
            for handler in getattr(node, "handlers", []) or []:
                yield from _module_level(handler.body)


def _registry_aliases(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """Local names bound to registries (``from bench import image_attacks as ia`` -> ``{"ia": "image_attacks"}``)
    and local names bound to the modules ``bench`` / ``bench.registries``."""
    aliases: dict[str, str] = {}
    modules: set[str] = set()
    for node in _module_level(tree.body):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ("markbench", "markbench.registries",
                                                                                   "markbench.world"):
            for a in node.names:
                if a.name in REGISTRY_NAMES:
                    aliases[a.asname or a.name] = a.name
                elif a.name == "registries" and node.module == "markbench":
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("markbench", "markbench.registries"):
                    modules.add(a.asname or a.name.split(".")[0])
    return aliases, modules


def _decorator_registry(dec: ast.expr, aliases: dict[str, str], modules: set[str]) -> str | None:
    """The registry a ``<x>.register(...)`` decorator names, or None if it is not a registry decorator."""
    if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "register"):
        return None
    owner = dec.func.value
    if isinstance(owner, ast.Name):
        return aliases.get(owner.id)
    if isinstance(owner, ast.Attribute) and owner.attr in REGISTRY_NAMES:
        base = owner.value
        while isinstance(base, ast.Attribute):
            base = base.value
        if isinstance(base, ast.Name) and base.id in modules:
            return owner.attr
    return None


def _scan_module(tree: ast.Module, module: str, path: str, result: ScanResult) -> None:
    aliases, modules = _registry_aliases(tree)
    evaluator = _evaluator(module, path, tree)

    def visit(body: list[ast.stmt], qual: str, reachable: bool) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                qualname = f"{qual}.{node.name}" if qual else node.name
                for dec in node.decorator_list:
                    reg = _decorator_registry(dec, aliases, modules)
                    if reg is None:
                        continue
                    args = dec.args  # type: ignore[attr-defined]
                    where = f"{path}:{dec.lineno}"
                    if not args or not isinstance(args[0], ast.Constant) or not isinstance(args[0].value, str):
                        result.unreadable.append(f"{where}: the plugin name is not a string literal")
                        continue
                    if not reachable:
                        result.unreadable.append(f"{where}: the class is defined inside a function")
                        continue
                    info = evaluator.info(node, reg)
                    result.found.append(Found(reg, args[0].value, f"{module}:{qualname}", path, dec.lineno, info))
                visit(node.body, qualname, reachable)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, f"{qual}.{node.name}" if qual else node.name, False)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for part in ("body", "orelse", "finalbody"):
                    visit(getattr(node, part, []) or [], qual, reachable)
                for handler in getattr(node, "handlers", []) or []:
                    visit(handler.body, qual, reachable)

    visit(tree.body, "", True)


# -------------------------------------------------------------------------------------------------------------
# Reading declarations without running them
# -------------------------------------------------------------------------------------------------------------
class _NotStatic(Exception):
    pass


class _Opaque:
    """A value the scan cannot compute (e.g. the class in ``{"relu": nn.ReLU}``); a declaration holding one is
    not static."""


_OPAQUE = _Opaque()
_EVALUATORS: dict[str, "_Evaluator"] = {}


def _evaluator(module: str, path: str, tree: ast.Module | None = None) -> "_Evaluator":
    if path not in _EVALUATORS:
        if tree is None:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), filename=path)
        _EVALUATORS[path] = _Evaluator(tree, module)
    return _EVALUATORS[path]


def _module_evaluator(module: str) -> "_Evaluator":
    """The evaluator of another module (for ``from x import CONSTANT``), found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise _NotStatic
    return _evaluator(module, spec.origin)


_BUILTIN_CALLS = {"list": list, "tuple": tuple, "dict": dict, "float": float, "int": int, "str": str,
                  "bool": bool, "frozenset": frozenset, "sorted": sorted, "round": round, "abs": abs,
                  "min": min, "max": max}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Pow: lambda a, b: a ** b}
_BASES = ("Plugin", "Defense", "ImageAttack", "ModelAttack", "Metric")


class _Evaluator:
    """Evaluates the plain expressions of a plugin declaration: literals, ``Param(...)``, module constants,
    attributes of classes of the same module and of bench's base classes. Anything else is :class:`_NotStatic`."""

    def __init__(self, tree: ast.Module, module: str = ""):
        self.module = module
        self.imports: dict[str, tuple[str, str]] = {}
        self.assigns: dict[str, list[ast.expr]] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        self.param_names: set[str] = set()
        self.declare_names: set[str] = set()  # local names of bench.param (typed-attribute declarations)
        self.base_names: dict[str, str] = {}
        for node in _module_level(tree.body):
            if isinstance(node, ast.ImportFrom) and node.module in ("markbench", "markbench.params",
                                                                    "markbench.plugins"):
                for a in node.names:
                    if a.name == "Param":
                        self.param_names.add(a.asname or a.name)
                    elif a.name == "param":
                        self.declare_names.add(a.asname or a.name)
                    elif a.name in _BASES:
                        self.base_names[a.asname or a.name] = a.name
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        self.assigns.setdefault(t.id, []).append(node.value)
                    elif isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple) and \
                            len(t.elts) == len(node.value.elts):
                        for name, value in zip(t.elts, node.value.elts):
                            if isinstance(name, ast.Name):
                                self.assigns.setdefault(name.id, []).append(value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                self.assigns.setdefault(node.target.id, []).append(node.value)
            elif isinstance(node, ast.ClassDef):
                self.classes[node.name] = node
            elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("__"):
                source = node.module
                if node.level:
                    parts = module.split(".")
                    source = ".".join(parts[:len(parts) - node.level] + [node.module])
                for a in node.names:
                    self.imports[a.asname or a.name] = (source, a.name)

    # -- expressions ------------------------------------------------------------------------------------------
    def value(self, node: ast.expr, depth: int = 0) -> Any:
        if depth > 50:
            raise _NotStatic
        ev = lambda n: self.value(n, depth + 1)  # noqa: E731
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = []
            for e in node.elts:
                if isinstance(e, ast.Starred):
                    items.extend(ev(e.value))
                else:
                    items.append(ev(e))
            return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise _NotStatic
            return {ev(k): self._maybe(v, depth + 1) for k, v in zip(node.keys, node.values)}  # type: ignore
        if isinstance(node, ast.Name):
            bound = self.assigns.get(node.id)
            if bound is None and node.id in self.imports and node.id not in self.param_names:
                source, name = self.imports[node.id]
                if not any(source == p or source.startswith(p + ".") for p in BUILTIN_PACKAGES + ("markbench",)):
                    raise _NotStatic  # only our own modules are read
                other = _module_evaluator(source)
                return other.value(ast.Name(id=name, ctx=ast.Load()), depth + 1)
            if bound is None or len(bound) != 1:
                raise _NotStatic
            return ev(bound[0])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in self.classes:
            return self.class_attr(self.classes[node.value.id], node.attr, depth + 1)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                self.imports.get(node.value.id, ("", ""))[0] in ("markbench", "markbench.plugins"):
            from . import plugins  # a member of one of bench's closed axes (``ThreatSetting.API``): light to import

            axis = getattr(plugins, self.imports[node.value.id][1], None)
            if isinstance(axis, type) and issubclass(axis, enum.Enum) and node.attr in axis.__members__:
                return axis[node.attr]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join" \
                and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str) \
                and len(node.args) == 1 and not node.keywords:
            return node.func.value.value.join(ev(node.args[0]))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "math" and not node.keywords:
            import math

            fn = getattr(math, node.func.attr, None)
            if callable(fn):
                return fn(*[ev(a) for a in node.args])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [ev(a) for a in node.args if not isinstance(a, ast.Starred)]
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                raise _NotStatic
            kwargs = {k.arg: ev(k.value) for k in node.keywords}
            if node.func.id in self.param_names:
                from .params import Param

                return Param(*args, **kwargs)
            if node.func.id in _BUILTIN_CALLS:
                return _BUILTIN_CALLS[node.func.id](*args, **kwargs)
        raise _NotStatic

    def _maybe(self, node: ast.expr, depth: int) -> Any:
        try:
            return self.value(node, depth)
        except _NotStatic:
            return _OPAQUE

    def class_attr(self, cls: ast.ClassDef, attr: str, depth: int = 0) -> Any:
        """``cls.attr`` following the bases (classes of this module, then bench's base classes)."""
        if depth > 50:
            raise _NotStatic
        if attr == "params":
            declared = self._declared(cls, depth)
            if declared:  # typed attributes: after the inherited parameters, as Plugin.__init_subclass__ does
                from .params import params_from_attributes

                try:
                    inherited = self._inherited(cls, "params", depth, complete=False)
                except AttributeError:
                    inherited = ()
                namespace = {name: d for name, (_, d) in declared.items()}
                annotations = {name: ann for name, (ann, _) in declared.items()}
                value = params_from_attributes(cls.name, namespace, annotations, tuple(inherited))
                return self._with_strength(cls, value, depth) if self._is_image_attack(cls) else value
        found: ast.expr | None = None
        for stmt in cls.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in stmt.targets):
                found = stmt.value
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == attr:
                if stmt.value is None:
                    continue
                found = stmt.value
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == attr:
                raise _NotStatic
        if found is not None:
            value = self.value(found, depth + 1)
            if attr == "params" and self._is_image_attack(cls):
                value = self._with_strength(cls, value, depth)
            return value
        return self._inherited(cls, attr, depth)

    def _declared(self, cls: ast.ClassDef, depth: int) -> dict[str, tuple[str, Any]]:
        """``name -> (annotation, Declared)`` of the class body's ``name: type = param(...)`` lines."""
        from .params import param

        out: dict[str, tuple[str, Any]] = {}
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                    isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name) and \
                    stmt.value.func.id in self.declare_names:
                call = stmt.value
                if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
                    raise _NotStatic
                args = [self.value(a, depth + 1) for a in call.args]
                kwargs = {k.arg: self.value(k.value, depth + 1) for k in call.keywords}
                out[stmt.target.id] = (ast.unparse(stmt.annotation), param(*args, **kwargs))
        return out

    def _inherited(self, cls: ast.ClassDef, attr: str, depth: int, complete: bool = True) -> Any:
        """``attr`` as ``cls`` inherits it from its bases (``complete``: an image attack's ``params`` straight from
        bench's base class get ``strength`` appended, as for a class that declares no parameters of its own)."""
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in self.classes:
                try:
                    return self.class_attr(self.classes[base.id], attr, depth + 1)
                except AttributeError:
                    continue
            if isinstance(base, ast.Name) and base.id in self.base_names:
                from . import plugins

                real = getattr(plugins, self.base_names[base.id])
                if hasattr(real, attr):
                    value = getattr(real, attr)
                    if attr == "params" and complete and self._is_image_attack(cls):
                        value = self._with_strength(cls, value, depth)
                    return value
                continue
            raise _NotStatic  # a base the scan cannot read
        raise AttributeError(attr)

    def _is_image_attack(self, cls: ast.ClassDef, depth: int = 0) -> bool:
        if depth > 50:
            return False
        for base in cls.bases:
            if isinstance(base, ast.Name):
                if self.base_names.get(base.id) == "ImageAttack":
                    return True
                if base.id in self.classes and self._is_image_attack(self.classes[base.id], depth + 1):
                    return True
        return False

    def _with_strength(self, cls: ast.ClassDef, params: Any, depth: int) -> tuple:
        from .plugins import ImageAttack

        try:
            mapping = self.class_attr(cls, "strength_mapping", depth + 1)
        except AttributeError:
            mapping = ImageAttack.strength_mapping
        return ImageAttack.complete_params(tuple(params), mapping)

    # -- one plugin ------------------------------------------------------------------------------------------
    def info(self, cls: ast.ClassDef, registry: str) -> StaticInfo | None:
        try:
            doc = ast.get_docstring(cls, clean=False)
            version = self.class_attr(cls, "version")
            params = tuple(self.class_attr(cls, "params"))
        except (_NotStatic, AttributeError, TypeError, ValueError):
            return None
        from .params import Param

        if not isinstance(version, str) or not all(isinstance(p, Param) for p in params):
            return None
        if any(_holds_opaque(v) for p in params for v in (p.default, p.low, p.high, p.choices, p.doc)):
            return None
        extra = []
        for attr in LISTED_ATTRS:
            try:
                v = self.class_attr(cls, attr)
            except (_NotStatic, AttributeError, TypeError, ValueError):
                continue
            extra.append((attr, getattr(v, "value", v)))
        return StaticInfo(inspect.cleandoc(doc) if doc else "", version, params, tuple(extra))


def _holds_opaque(v: Any) -> bool:
    if isinstance(v, _Opaque):
        return True
    if isinstance(v, (list, tuple, set, frozenset)):
        return any(_holds_opaque(x) for x in v)
    if isinstance(v, dict):
        return any(_holds_opaque(x) for x in v.values())
    return False


# -------------------------------------------------------------------------------------------------------------
# The built-ins, scanned once per process
# -------------------------------------------------------------------------------------------------------------
_SCAN: ScanResult | None = None


def builtins_scan() -> ScanResult:
    """The scan of :data:`BUILTIN_PACKAGES` (once per process)."""
    global _SCAN
    if _SCAN is None:
        _SCAN = scan(BUILTIN_PACKAGES)
    return _SCAN


def builtin_plugins(registry: str) -> list[Found]:
    """The built-ins whose decorator names ``registry`` (e.g. ``"image_attacks"``)."""
    return [f for f in builtins_scan().found if f.registry == registry]


def is_builtin_module(module: str) -> bool:
    """True for a module inside one of the built-in plugin packages (or ``bench`` itself)."""
    return any(module == p or module.startswith(p + ".") for p in BUILTIN_PACKAGES + ("markbench",))
