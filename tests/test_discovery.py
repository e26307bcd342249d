"""Built-ins come from their decorators alone (bench.discovery): the static scan, what it reads without importing,
and a newcomer's one-file attack that appears in `bench ls`, a grid and the contract suite with no other edit."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from markbench.discovery import BUILTIN_PACKAGES, _module_files, builtins_scan, scan
from markbench.registries import REGISTRIES

REPO = Path(__file__).resolve().parents[1]

#: A newcomer's whole contribution: one file in attacks/image/.
POSTERIZE = '''\
"""Posterization: fewer grey levels per channel."""

from __future__ import annotations

import torch

from markbench import ImageAttack, image_attacks, param


@image_attacks.register("posterize")
class Posterize(ImageAttack):
    """Posterize to ``levels`` grey levels per channel: ``round(x (levels - 1)) / (levels - 1)``.

    Strength mapping: ``levels = round(2 ** (8 - 6 s))``, 256 levels (the identity on 8-bit images) at s=0 down to
    4 at s=1 (s=0.5 gives the default 32). A classic quantisation attack (Petitcolas et al., 1998).
    """

    version = "1"
    strength_mapping = "levels = round(2 ** (8 - 6 s))"
    deterministic = True
    levels: int = param(32, "grey levels per channel", low=2, high=256)

    @classmethod
    def from_strength(cls, s: float) -> dict:
        return {"levels": round(2 ** (8 - 6 * s))}

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        steps = self.levels - 1
        return ((images * steps).round() / steps).clamp(0.0, 1.0)
'''


def test_scan_reads_every_builtin_decorator():
    result = builtins_scan()
    assert result.unreadable == []
    by_registry = {}
    for f in result.found:
        by_registry.setdefault(f.registry, set()).add(f.name)
    assert {"jpeg", "gaussian_blur", "none", "combination"} <= by_registry["image_attacks"]
    assert {"dwtdctsvd", "sleepermark", "none"} <= by_registry["defenses"]
    assert {"lora", "prune"} <= by_registry["model_attacks"] and {"fid", "tpr"} <= by_registry["metrics"]


def test_scan_equals_what_the_decorators_register_when_imported():
    """Import every module of the built-in packages: the registries then hold exactly the scanned built-ins."""
    for package in BUILTIN_PACKAGES:
        for module, _ in _module_files(package):
            importlib.import_module(module)
    scanned = {(f.registry, f.name, f.target) for f in builtins_scan().found}
    from markbench.world import worlds

    registered = set()
    for key, reg in {**REGISTRIES, "worlds": worlds}.items():
        for name in reg.names():
            if reg.origin(name) == "markbench":
                cls = reg.get(name)
                registered.add((key, name, f"{cls.__module__}:{cls.__qualname__}"))
    assert scanned == registered


def test_static_reading_equals_the_imported_class():
    """What `bench ls` shows without importing (docstring, version, parameters) is what the class declares."""
    from markbench.world import worlds

    registries = {**REGISTRIES, "worlds": worlds}
    static = [f for f in builtins_scan().found]
    assert all(f.info is not None for f in static), [f.name for f in static if f.info is None]
    for f in static:
        cls = registries[f.registry].get(f.name)
        assert f.info.doc == inspect.cleandoc(cls.__doc__ or ""), f.name
        assert f.info.version == cls.version, f.name
        assert tuple(f.info.params) == tuple(cls.params), f.name


def _package(tmp_path: Path, files: dict[str, str]) -> str:
    root = tmp_path / "newpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return "newpkg"


def test_scan_follows_aliases_and_reports_what_it_cannot_read(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = _package(tmp_path, {
        "a.py": '''
            import markbench
            from markbench import image_attacks as ia, Param, ImageAttack
            LEVELS = (2, 4)

            @ia.register("alias")
            class A(ImageAttack):
                """Alias."""
                version = "2"
                params = (Param("n", "int", 2, choices=LEVELS),)

            if True:
                @markbench.model_attacks.register("dotted")
                class B:
                    """Dotted."""
                    version = "1"

            NAME = "x"

            @ia.register(NAME)
            class C(ImageAttack):
                pass

            def factory():
                @ia.register("inner")
                class D(ImageAttack):
                    pass
        ''',
        "b.py": '''
            from markbench.registries import metrics
            import torch

            @metrics.register("computed")
            class M:
                """Params computed at import."""
                version = "1"
                params = tuple(torch.arange(2).tolist())
        ''',
    })
    result = scan([pkg])
    found = {f.name: f for f in result.found}
    assert {n: (f.registry, f.target) for n, f in found.items()} == {
        "alias": ("image_attacks", "newpkg.a:A"), "dotted": ("model_attacks", "newpkg.a:B"),
        "computed": ("metrics", "newpkg.b:M")}
    alias = found["alias"].info
    assert alias.version == "2" and [p.name for p in alias.params] == ["n", "strength"]  # strength added
    assert alias.params[0].choices == (2, 4)
    assert found["computed"].info is None  # needs running code: `bench ls` imports it instead
    assert len(result.unreadable) == 2
    assert "not a string literal" in result.unreadable[0] and "inside a function" in result.unreadable[1]
    assert "newpkg.b" not in sys.modules and "newpkg.a" not in sys.modules


def _tree_with_newcomer(tmp_path: Path) -> Path:
    """A copy of the repository in which attacks/image/ holds one more file (the rest is linked, not copied)."""
    root = tmp_path / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name in ("attacks", ".git") or entry.name.startswith("."):
            continue
        (root / entry.name).symlink_to(entry)
    (root / "attacks").mkdir()
    for entry in (REPO / "attacks").iterdir():
        if entry.name not in ("image", "__pycache__"):
            (root / "attacks" / entry.name).symlink_to(entry)
    (root / "attacks" / "image").mkdir()
    for f in (REPO / "attacks" / "image").glob("*.py"):
        (root / "attacks" / "image" / f.name).write_text(f.read_text())
    (root / "attacks" / "image" / "posterize.py").write_text(POSTERIZE)  # the only addition
    # the folders as pip installs them (pyproject's package-dir): bench/ is `markbench`, attacks/ `markbench.attacks`
    site = root / ".site" / "markbench"
    site.mkdir(parents=True)
    for entry in (root / "bench").iterdir():
        if entry.name != "__pycache__":
            (site / entry.name).symlink_to(entry)
    for sub in ("attacks", "defenses", "reports", "worlds"):
        (site / sub).symlink_to(root / sub)
    return root


def _env(root: Path) -> dict[str, str]:
    """PYTHONPATH on which `markbench` is the copied tree (ahead of the editable install of the real one)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / ".site"), str(root)])}


def _run(root: Path, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = _env(root)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_newcomer_one_file_attack_appears_in_ls_grid_and_contract(tmp_path):
    from tests.conftest import MICRO_TOML

    root = _tree_with_newcomer(tmp_path)
    config = tmp_path / "grid.toml"
    config.write_text(MICRO_TOML.replace('name = "jpeg"\nquality = [90, 50]',
                                         'name = "posterize"\nstrength = [0.2, 0.8]').format(output=tmp_path / "out"))
    out = _run(root, f'''
        import sys
        from markbench.cli import main
        assert main(["ls", "image-attacks"]) == 0
        print("TORCH", "torch" in sys.modules)
        assert main(["run", "--dry-run", "--no-progress", "--config", {str(config)!r}]) == 0
        from markbench import image_attacks
        from markbench.testing import contract_cases
        cls = image_attacks.get("posterize")
        assert cls.__module__ == "markbench.attacks.image.posterize"
        assert image_attacks.origin("posterize") == "markbench"
        cases = contract_cases(cls)
        for case in cases:
            plugin, check = case.values
            check(plugin)
        print("CONTRACT", len(cases), "checks passed")
    ''')
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    listing = text[:text.index("TORCH")]
    assert "posterize" in listing and "levels: int = 32" in listing and "Posterize to" in listing
    assert "TORCH False" in text  # listed from its source, not imported
    assert "posterize(strength=0.2)" in text and "posterize(strength=0.8)" in text  # two columns of the grid
    from markbench.testing import IMAGE_ATTACK_CHECKS

    assert f"CONTRACT {len(IMAGE_ATTACK_CHECKS)} checks passed" in text  # every image-attack check of the suite


@pytest.mark.slow
def test_newcomer_attack_runs_in_the_repository_contract_tests(tmp_path):
    """The repository's own parametrized contract tests pick the new file up (pytest in the copied tree)."""
    from markbench.testing import IMAGE_ATTACK_CHECKS

    root = _tree_with_newcomer(tmp_path)
    env = _env(root)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_image_attacks.py",
                          "-k", "posterize"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    # every image-attack contract check and the built-ins' defaults-equal-mid-strength test, each with id
    # [posterize...]
    assert f"{len(IMAGE_ATTACK_CHECKS) + 1} passed" in out.stdout and "failed" not in out.stdout
