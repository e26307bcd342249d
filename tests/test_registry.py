from __future__ import annotations

import subprocess
import sys

import pytest

from markbench import Defense, Detection, ImageAttack, ModelAttack, Param, image_attacks, metrics, model_attacks
from markbench.registries import defenses
from markbench.errors import ConfigError, PluginValidationError
from markbench.plugins import DetectionKind, MarkLocation
from markbench.discovery import builtin_plugins
from markbench.registry import EntryPointGroup, PluginLoadWarning, Registry


class _Base:
    version = "1"
    params = ()


def _fresh() -> Registry:
    return Registry("defense", Defense)


class Good(Defense):
    version = "1"
    location = MarkLocation.POST_HOC
    params = (Param("bits", "int", 48, low=1, high=64),)

    def mark(self, images, secret, ctx):
        return images

    def detect(self, secret, images, ctx):
        return Detection(bits=None)


def test_register_and_get_with_decorator():
    reg = _fresh()
    reg.register("good")(Good)
    assert reg.get("good") is Good and reg.names() == ["good"] and Good.name == "good"


def test_wrong_base_class_refused():
    reg = _fresh()
    with pytest.raises(PluginValidationError, match="subclass"):
        reg.register("x", _Base)


def test_missing_version_refused():
    class NoVersion(Good):
        version = ""

    with pytest.raises(PluginValidationError, match="version"):
        _fresh().register("nv", NoVersion)


@pytest.mark.parametrize("param, match", [
    (Param("q", "int", 500, low=1, high=100), "default 500"),
    (Param("q", "complex", 1), "type"),
    (Param("q", "str", "a", choices=("b", "c")), "default 'a'"),
    (Param("name", "int", 1), "reserved"),
])
def test_bad_parameter_declarations_refused(param, match):
    class Bad(Good):
        params = (param,)

    with pytest.raises(PluginValidationError, match=match):
        _fresh().register("bad", Bad)


def test_post_hoc_defence_must_implement_mark():
    class NoMark(Defense):
        version = "1"
        location = MarkLocation.POST_HOC

        def detect(self, secret, images, ctx):
            return Detection()

    with pytest.raises(PluginValidationError, match="mark"):
        _fresh().register("nomark", NoMark)


def test_duplicate_name_names_both_origins():
    reg = _fresh()
    reg.register("good", Good)

    class Other(Good):
        pass

    with pytest.raises(PluginValidationError, match="already registered by tests.test_registry .*refusing.*from thirdparty 1.0"):
        reg.register("good", Other, origin="thirdparty 1.0")


def test_unknown_name_did_you_mean_and_list():
    with pytest.raises(ConfigError) as e:
        image_attacks.get("jepg")
    msg = str(e.value)
    assert "did you mean 'jpeg'" in msg and "available:" in msg and "gaussian_blur" in msg


def test_ls_and_help_import_neither_torch_nor_diffusers():
    code = ("import sys\nimport markbench\nfrom markbench.cli import main\nmain(['ls'])\n"
            "main(['ls', 'attacks', '-v'])\nprint('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "jpeg" in out.stdout and "quality: int = 50" in out.stdout  # the listing itself is there
    assert out.stdout.strip().splitlines()[-1] == "False False"
    help_out = subprocess.run([sys.executable, "-c", "import sys\nfrom markbench.cli import main\n"
                               "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                               "print('torch' in sys.modules, 'diffusers' in sys.modules)"],
                              capture_output=True, text=True, timeout=120)
    assert help_out.stdout.strip().splitlines()[-1] == "False False"


class _FakeDist:
    name, version = "acme-marks", "2.0"


class _FakeEP:
    """An entry point as importlib.metadata gives it (name, value, group, dist, load)."""

    def __init__(self, name, group, obj=None, error=None, value="acme:X"):
        self.name, self.group, self.value, self.dist = name, group, value, _FakeDist()
        self._obj, self._error = obj, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._obj


def _fake_entry_points(monkeypatch, eps):
    import importlib.metadata as md

    monkeypatch.setattr(md, "entry_points", lambda group=None: [ep for ep in eps if ep.group == group])


class _Noise(ImageAttack):
    """A third-party image attack."""

    version = "1"
    strength_mapping = "nothing"

    @classmethod
    def from_strength(cls, s):
        return {}

    def apply(self, images, generator):
        return images


class _Prune(ModelAttack):
    """A third-party model attack."""

    version = "1"

    def apply(self, pipe, ctx):
        return pipe


def test_entry_point_plugins_go_through_register(monkeypatch):
    _fake_entry_points(monkeypatch, [_FakeEP("acme", "bench.defenses", Good)])
    reg = Registry("defense", Defense, "bench.defenses")
    assert reg.get("acme") is Good and reg.origin("acme") == "acme-marks 2.0"


def test_one_attack_group_routes_each_class_to_the_registry_of_its_base(monkeypatch):
    _fake_entry_points(monkeypatch, [_FakeEP("acme_noise", "bench.attacks", _Noise),
                                     _FakeEP("acme_prune", "bench.attacks", _Prune)])
    group = EntryPointGroup("bench.attacks")
    images = Registry("image attack", ImageAttack, group)
    models = Registry("model attack", ModelAttack, group)
    assert images.names() == ["acme_noise"] and models.names() == ["acme_prune"]
    assert images.get("acme_noise") is _Noise and models.origin("acme_prune") == "acme-marks 2.0"
    # the group is read once, whichever registry asks first
    assert not hasattr(Registry, "_load_attack_entry_points") and images.group is models.group


def test_broken_entry_points_warn_once_and_fail_only_where_used(monkeypatch):
    _fake_entry_points(monkeypatch, [
        _FakeEP("acme_gone", "bench.defenses", error=ModuleNotFoundError("No module named 'acme.gone'"),
                value="acme.gone:Mark"),
        _FakeEP("acme_wrong", "bench.defenses", _Base),
        _FakeEP("acme", "bench.defenses", Good),
    ])
    reg = Registry("defense", Defense, "bench.defenses")
    with pytest.warns(PluginLoadWarning) as record:
        assert reg.names() == ["acme"]  # the good plugin of the same package still loads
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and all("acme-marks 2.0" in m for m in messages)
    assert "acme.gone:Mark" in messages[0] and "No module named 'acme.gone'" in messages[0]
    import warnings

    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert reg.names() == ["acme"] and "acme" in reg
    assert again == []  # the group is read once: warned once
    with pytest.raises(ConfigError, match="bench.toml: defenses.0.: defense 'acme_gone' cannot be used: .*acme-marks"):
        reg.get("acme_gone", where="bench.toml: defenses[0]")
    with pytest.raises(ConfigError, match="acme_wrong.*subclass of markbench.plugins.Defense"):
        reg.get("acme_wrong")


def test_decorated_and_entry_point_plugin_is_from_its_package(monkeypatch):
    reg = Registry("defense", Defense, "bench.defenses")

    def load():  # what importing the package's module does: its decorator runs
        reg.register("acme_deco")(Deco)
        return Deco

    class Deco(Good):
        """Decorated in its own package and exposed through an entry point."""

    ep = _FakeEP("acme_deco", "bench.defenses")
    ep.load = load
    _fake_entry_points(monkeypatch, [ep])
    assert reg.names() == ["acme_deco"] and reg.origin("acme_deco") == "acme-marks 2.0"


def test_entry_point_name_clashing_with_a_builtin_is_refused_not_fatal(monkeypatch):
    _fake_entry_points(monkeypatch, [_FakeEP("jpeg", "bench.attacks", _Noise)])
    group = EntryPointGroup("bench.attacks")
    reg = Registry("image attack", ImageAttack, group, builtins=lambda: builtin_plugins("image_attacks"))
    with pytest.warns(PluginLoadWarning, match="jpeg.*clashes with the one of the same name from markbench"):
        names = reg.names()
    assert "jpeg" in names and reg.describe_lazy("jpeg") == "markbench.attacks.image.jpeg:JPEG"


@pytest.mark.parametrize("registry", [defenses, image_attacks, model_attacks, metrics],
                         ids=["defenses", "image_attacks", "model_attacks", "metrics"])
def test_every_builtin_loads_and_validates(registry):
    for name in registry.names():
        cls = registry.get(name)
        assert cls.name == name and cls.version and (cls.__doc__ or "").strip(), name
        cls()  # defaults instantiate


def test_strength_maps_through_declared_ranges():
    jpeg = image_attacks.get("jpeg")(strength=1.0)
    assert jpeg.params["quality"] == 10
    assert isinstance(image_attacks.get("jpeg")(strength=0.0), ImageAttack)
    assert defenses.get("dwtdct").detection is DetectionKind.BITS


def test_a_plugin_that_exits_at_import_is_one_warning_not_the_end_of_every_command(monkeypatch):
    """sys.exit() at a third-party module's import raises SystemExit, which is not an Exception: it used to end
    `bench ls`, `validate` and `run` silently with its code (an audit found exit 3 and no output)."""
    _fake_entry_points(monkeypatch, [_FakeEP("acme_exit", "bench.defenses", error=SystemExit(3),
                                             value="acme.exits:Mark"), _FakeEP("acme", "bench.defenses", Good)])
    reg = Registry("defense", Defense, "bench.defenses")
    with pytest.warns(PluginLoadWarning, match="acme.exits:Mark.*could not be imported .SystemExit: 3"):
        assert reg.names() == ["acme"]
