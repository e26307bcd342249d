from __future__ import annotations

import subprocess
import sys

import pytest

from bench import Defense, Detection, ImageAttack, Param, defenses, image_attacks, metrics, model_attacks
from bench.errors import ConfigError, PluginValidationError
from bench.plugins import DetectionKind, MarkLocation
from bench.registry import Registry


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

    with pytest.raises(PluginValidationError, match="already registered by markbench.*refusing"):
        reg.register("good", Other, origin="thirdparty 1.0")


def test_unknown_name_did_you_mean_and_list():
    with pytest.raises(ConfigError) as e:
        image_attacks.get("jepg")
    msg = str(e.value)
    assert "did you mean 'jpeg'" in msg and "available:" in msg and "gaussian_blur" in msg


def test_lazy_builtins_do_not_import_diffusers():
    code = ("import sys\nfrom bench.cli import main\nmain(['ls'])\n"
            "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
            "main(['--help']) if False else None\nprint('OK')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")
    help_out = subprocess.run([sys.executable, "-c", "import sys\nfrom bench.cli import main\n"
                               "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                               "print('torch' in sys.modules, 'diffusers' in sys.modules)"],
                              capture_output=True, text=True, timeout=120)
    assert help_out.stdout.strip().splitlines()[-1] == "False False"


def test_entry_point_plugins_go_through_register(monkeypatch):
    import importlib.metadata as md

    class FakeDist:
        name, version = "acme-marks", "2.0"

    class FakeEP:
        name, value, group, dist = "acme", "acme:Good", "bench.defenses", FakeDist()

        def load(self):
            return Good

    class BadEP(FakeEP):
        name = "acme_bad"

        def load(self):
            return _Base

    monkeypatch.setattr(md, "entry_points", lambda group=None: [FakeEP()] if group == "bench.defenses" else [])
    reg = Registry("defense", Defense, "bench.defenses")
    assert reg.get("acme") is Good and reg.origin("acme") == "acme-marks 2.0"

    monkeypatch.setattr(md, "entry_points", lambda group=None: [BadEP()] if group == "bench.defenses" else [])
    reg2 = Registry("defense", Defense, "bench.defenses")
    with pytest.raises(PluginValidationError, match="subclass"):
        reg2.names()


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
