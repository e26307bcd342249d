"""Plugin parameters declared once, as typed class attributes (``bits: int = param(30, ...)``).

The generated ``params`` tuple is checked against an explicit ``Param`` tuple written independently; instance values
have their declared types; what ``bench ls`` reads without importing equals the imported class; no built-in casts its
own typed parameters back to the type they already have.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path

import pytest

from markbench import Defense, ImageAttack, Param, param
from markbench.discovery import builtins_scan, scan
from markbench.errors import ConfigError, PluginValidationError
from markbench.params import annotation_type

ROOT = Path(__file__).resolve().parents[1]


class _Typed(Defense):
    bits: int = param(30, "message length", low=1, high=1024)
    lr: float = param(1e-3, "learning rate", low=0.0)
    schedule: str = param("constant", "schedule", choices=("constant", "cosine"))
    scale: float | None = param(None, "optional scale", low=0.0)
    layers: list[str] = param(["crop", "jpeg"], "noise layers")
    qualities: list[int] = param([50], "qualities")
    adversary: bool = param(True, "train the adversary")


_EXPLICIT = (
    Param("bits", "int", 30, "message length", low=1, high=1024),
    Param("lr", "float", 1e-3, "learning rate", low=0.0),
    Param("schedule", "str", "constant", "schedule", choices=("constant", "cosine")),
    Param("scale", "float", None, "optional scale", low=0.0, optional=True),
    Param("layers", "list[str]", ["crop", "jpeg"], "noise layers"),
    Param("qualities", "list[int]", [50], "qualities"),
    Param("adversary", "bool", True, "train the adversary"),
)


def test_typed_attributes_generate_the_same_params_as_an_explicit_tuple_in_written_order():
    assert _Typed.params == _EXPLICIT
    assert not any(p.name in vars(_Typed) for p in _EXPLICIT), "the class keeps only the annotations"


def test_instance_values_have_the_declared_types_and_list_defaults_are_not_shared():
    a = _Typed(bits=4, lr=1)  # an int given for a float parameter arrives as a float
    assert (a.bits, type(a.bits)) == (4, int)
    assert (a.lr, type(a.lr)) == (1.0, float)
    assert a.scale is None and a.adversary is True
    a.layers.append("blur")
    assert _Typed().layers == ["crop", "jpeg"]
    with pytest.raises(ConfigError, match="bits = 0 is invalid"):
        _Typed(bits=0)


def test_a_subclass_redeclares_in_place_and_adds_after_the_inherited():
    class Sub(_Typed):
        lr: float = param(1e-2, "faster")
        extra: int = param(1, "one more")

    assert [p.name for p in Sub.params] == [p.name for p in _EXPLICIT] + ["extra"]
    assert Sub().lr == 1e-2 and Sub().bits == 30


def test_image_attack_declarations_get_the_normalised_strength_after_them():
    class Attack(ImageAttack):
        quality: int = param(50, "JPEG quality", low=1, high=100)

    assert [p.name for p in Attack.params] == ["quality", "strength"]


@pytest.mark.parametrize("body, match", [
    ("bits: int = param(3)\n    params = (Param('x', 'int', 1),)", "declared twice"),
    ("bits = param(3)", "needs a type annotation"),
    ("bits: dict = param({})", "not one of"),
    ("bits: int = param(0, low=1)", "default 0 of parameter 'bits' is invalid"),
])
def test_bad_typed_declarations_are_refused_with_the_reason(body, match):
    src = f"class Bad(Defense):\n    {body}\n"
    with pytest.raises(PluginValidationError, match=match):
        exec(src, {"Defense": Defense, "param": param, "Param": Param})


@pytest.mark.parametrize("annotation, expected", [
    ("int", ("int", False)), ("float | None", ("float", True)), ("Optional[str]", ("str", True)),
    ("list[float]", ("list[float]", False)), (float, ("float", False)), (list[int], ("list[int]", False)),
    (int | None, ("int", True)),
])
def test_annotation_types(annotation, expected):
    assert annotation_type(annotation) == expected


def test_static_scan_reads_typed_declarations_like_the_import(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "typedpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text(textwrap.dedent('''
        from __future__ import annotations
        from markbench import ImageAttack, image_attacks, param

        LEVELS = (2, 4)


        class Config:
            size: int = 7


        @image_attacks.register("_typed_scan_a")
        class A(ImageAttack):
            """Typed."""
            version = "1"
            n: int = param(2, "levels", choices=LEVELS)
            size: int = param(Config.size, "from a config class", low=1)
            sigma: float | None = param(None, "optional")


        @image_attacks.register("_typed_scan_b")
        class B(A):
            """Sub."""
            n: int = param(4, "levels", choices=LEVELS)
    '''))
    found = {f.name: f for f in scan(["typedpkg"]).found}
    from markbench.registries import image_attacks

    monkeypatch.setattr(image_attacks, "register", lambda name: (lambda cls: cls))  # import without registering
    mod = importlib.import_module("typedpkg.a")
    for name, cls in (("_typed_scan_a", mod.A), ("_typed_scan_b", mod.B)):
        assert found[name].info is not None, name
        assert tuple(found[name].info.params) == tuple(cls.params), name
    assert [p.name for p in mod.B.params] == ["n", "size", "sigma", "strength"]
    assert (mod.B.params[0].default, mod.A.params[1].default) == (4, 7)


def _own_typed(cls) -> dict[str, str]:
    return {p.name: p.type for p in cls.params if not p.optional}


def test_no_builtin_casts_its_own_typed_parameter_to_the_type_it_already_has():
    """``int(self.bits)`` where ``bits`` is declared ``int`` is the defensive cast that typed declarations remove."""
    from markbench.registries import defenses, image_attacks, metrics, model_attacks

    regs = {"defenses": defenses, "image_attacks": image_attacks, "model_attacks": model_attacks,
            "metrics": metrics}
    found = []
    for f in builtins_scan().found:
        if f.registry not in regs:
            continue
        cls = regs[f.registry].get(f.name)
        typed = _own_typed(cls)
        tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and len(call.args) == 1 and \
                    isinstance(call.args[0], ast.Attribute) and isinstance(call.args[0].value, ast.Name) and \
                    call.args[0].value.id == "self" and typed.get(call.args[0].attr) == call.func.id:
                found.append(f"{f.path}:{call.lineno}: {call.func.id}(self.{call.args[0].attr})")
    assert not found, found


def test_keyed_at_default_passes_through_to_the_generated_param():
    class Late(Defense):
        added: str = param("prefix", "added after artifacts shipped", choices=("prefix", "suffix"),
                           keyed_at_default=False)

    assert Late.params == (Param("added", "str", "prefix", "added after artifacts shipped",
                                 choices=("prefix", "suffix"), keyed_at_default=False),)


def test_list_float_elements_are_floats_like_a_float_parameter_and_must_be_finite():
    p = Param("x", "list[float]", [0.5])
    out = p.check([1, 2.5])
    assert out == [1.0, 2.5] and all(type(v) is float for v in out)
    for bad in ([float("nan")], [1.0, float("inf")], [True]):
        with pytest.raises(ValueError):
            p.check(bad)
    ints = Param("n", "list[int]", [1]).check([1, 2])
    assert ints == [1, 2] and all(type(v) is int for v in ints)
