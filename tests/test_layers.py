"""The layering that docs/architecture.md states, enforced by walking every import (function-local ones included).

The folders are installed under one name, ``markbench`` (``bench/`` is ``markbench``, ``attacks/`` is
``markbench.attacks``, and so on; pyproject's ``package_dir``): imports name the installed modules, and this file maps
them back to folders. Layers, bottom to top: the core ``bench`` (knows no world, no report, no plugin by name); the
plugins (``defenses``, ``attacks``: only the public plugin API of ``bench``); the worlds (``worlds``: providers, may
drive the core); ``reports`` (reads stored results). Probes (``experiments``) and ``benchmarks`` sit on top and are imported by no package (only by their own tests).
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the top-level folders installed under ``markbench`` (``bench`` is ``markbench`` itself)
FOLDERS = ("bench", "attacks", "defenses", "reports", "worlds")
#: where a module that imports a folder by its own name instead of its installed name may not live
CHECKED = (*FOLDERS, "tests", "experiments", "benchmarks")


def folder_name(module: str) -> str:
    """The folder path of an installed module name: ``markbench.attacks.image`` -> ``attacks.image``,
    ``markbench.stats`` -> ``bench.stats``; other names unchanged."""
    head, _, rest = module.partition(".")
    if head != "markbench":
        return module
    sub = rest.split(".")[0]
    if sub in FOLDERS[1:]:
        return rest
    return "bench" + ("." + rest if rest else "")

#: what the core may never import
_NOT_IN_CORE = ("reports", "worlds", "defenses", "attacks", "experiments", "benchmarks", "tests")
#: the modules of ``bench`` a plugin may import: the public API and the shared toolkits, never the harness
PLUGIN_API = ("bench", "bench.errors", "bench.params", "bench.plugins", "bench.registries", "bench.training",
              "bench.weights", "bench.generation", "bench.stats", "bench.prompts", "bench.data", "bench.world",
              "bench.models", "bench.noise", "bench.rng", "bench.packing", "bench.latents", "bench.inversion",
              "bench.latent_nets", "bench.downstream")
RULES: dict[str, tuple[str, ...]] = {
    # package -> forbidden import prefixes
    "bench": _NOT_IN_CORE,
    "defenses": ("reports", "worlds", "experiments", "benchmarks", "tests"),
    "attacks": ("reports", "worlds", "defenses", "experiments", "benchmarks", "tests"),
    "worlds": ("reports", "experiments", "benchmarks", "tests"),
    "reports": ("worlds", "defenses", "attacks", "experiments", "benchmarks", "tests"),
}


def violations(root: Path) -> list[str]:
    """Every import that breaks :data:`RULES` or the plugin API, as ``file:line: what``."""
    found: list[str] = []
    for package, forbidden in RULES.items():
        for f in sorted((root / package).rglob("*.py")):
            rel = f.relative_to(root)
            for line, name in _imports_rel(root, rel):
                head = name.split(".")[0]
                if head in forbidden or any(name == p or name.startswith(p + ".") for p in forbidden):
                    found.append(f"{rel}:{line}: {package} imports {name}")
                elif (package in ("defenses", "attacks") or rel.parts[:2] == ("bench", "measures")) and head == "bench":
                    # metric plugins (bench/measures) are plugins too: the public API, the toolkits, their own package
                    if name not in PLUGIN_API and not name.startswith("bench.measures"):
                        found.append(f"{rel}:{line}: plugin imports the harness module {name}")
    return sorted(set(found))


def _imports_rel(root: Path, rel: Path) -> list[tuple[int, str]]:
    """Every module the file ``root/rel`` imports, as folder paths: relative imports resolved against its package,
    ``from package import module`` as that module too (``from markbench import runner`` imports ``bench.runner``),
    and ``importlib.import_module`` / ``__import__`` with a literal name (aliased, by keyword, or relative to a
    literal package)."""
    tree = ast.parse((root / rel).read_text(encoding="utf-8"), filename=str(rel))
    pkg = list(rel.with_suffix("").parts[:-1])
    dynamic = {"import_module", "__import__"}
    for node in ast.walk(tree):  # ``from importlib import import_module as im``
        if isinstance(node, ast.ImportFrom) and node.module == "importlib":
            dynamic.update(a.asname for a in node.names if a.name == "import_module" and a.asname)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dynamic_import_name(node, dynamic)
            if name is not None:
                out.append((node.lineno, folder_name(name)))
        if isinstance(node, ast.Import):
            out.extend((node.lineno, folder_name(a.name)) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = folder_name(node.module or "")
            out.append((node.lineno, mod))
            for a in node.names:  # a name that is a module of the package is an import of that module
                sub = _canonical(f"{mod}.{a.name}" if mod else a.name)
                path = root.joinpath(*sub.split("."))
                if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
                    out.append((node.lineno, sub))
    return out


def _canonical(path: str) -> str:
    """A folder path as :func:`folder_name` gives it: ``bench.worlds`` (``markbench.worlds``) is ``worlds``."""
    parts = path.split(".")
    return ".".join(parts[1:]) if parts[0] == "bench" and len(parts) > 1 and parts[1] in FOLDERS[1:] else path


def _dynamic_import_name(node: ast.Call, dynamic: set[str]) -> str | None:
    """The installed module name of ``import_module("x")`` / ``__import__("x")`` (or an alias), if literal."""
    func = node.func
    fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if fname not in dynamic:
        return None
    args = list(node.args) + [k.value for k in node.keywords if k.arg in ("name", "package")]
    name = args[0] if args else None
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
        return None
    if name.value.startswith(".") and len(args) > 1 and isinstance(args[1], ast.Constant):
        return f"{args[1].value}.{name.value.lstrip('.')}"  # import_module(".worlds.micro", "markbench")
    return name.value


def folder_imports(root: Path) -> list[str]:
    """Every absolute import of a folder by its own name (``from bench.x import``, ``import attacks``): it works
    only from the repository root and would load a second copy of the module next to the installed one."""
    found = []
    for top in CHECKED:
        for f in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
                found += [f"{f.relative_to(root)}:{node.lineno}: imports {n}" for n in names
                          if n.split(".")[0] in FOLDERS]
    return sorted(found)


def test_every_import_names_the_installed_markbench_modules():
    assert folder_imports(ROOT) == []


def test_the_folder_import_check_fails_on_a_deliberate_violation(tmp_path):
    (tmp_path / "defenses").mkdir()
    (tmp_path / "defenses" / "a.py").write_text("from markbench import Defense\nfrom bench.stats import x\n"
                                                "import attacks.image\n")
    assert folder_imports(tmp_path) == ["defenses/a.py:2: imports bench.stats",
                                        "defenses/a.py:3: imports attacks.image"]


def test_every_package_folder_is_installed_under_markbench():
    """pyproject lists the packages by their installed names (``package-dir`` maps the folders): a new sub-package
    folder missing from the list would be absent from a wheel while every test run from the checkout passes."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert setup["package-dir"] == {"markbench" if f == "bench" else f"markbench.{f}": f for f in FOLDERS}
    folders = {".".join(i.parent.relative_to(ROOT).parts) for f in FOLDERS for i in (ROOT / f).rglob("__init__.py")}
    installed = {"markbench" + m[len("bench"):] if m.split(".")[0] == "bench" else f"markbench.{m}" for m in folders}
    assert installed == set(setup["packages"])


def test_the_repository_keeps_its_layers():
    assert violations(ROOT) == []


def test_the_layer_check_fails_on_a_deliberate_violation(tmp_path):
    for pkg in RULES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "bench" / "cli.py").write_text("def f():\n    from markbench.reports.html import render_report\n")
    (tmp_path / "bench" / "cache.py").write_text("from markbench.worlds.tiny import PREBUILT\n")
    (tmp_path / "bench" / "sub").mkdir()
    (tmp_path / "bench" / "sub" / "m.py").write_text("from ...defenses import x\n")  # relative, out of the core
    (tmp_path / "defenses" / "mine.py").write_text("from markbench import Defense\n"
                                                   "from markbench.runner import Runner\n")
    (tmp_path / "attacks" / "a.py").write_text("from markbench.stages import run_stage\n"
                                               "from markbench.training import x\n")
    (tmp_path / "reports" / "r.py").write_text("import markbench.defenses.sleepermark\n")
    (tmp_path / "bench" / "measures").mkdir()
    (tmp_path / "bench" / "measures" / "q.py").write_text("from markbench.stats import x\n"
                                                          "def f():\n    from markbench.runner import Runner\n")
    (tmp_path / "bench" / "models.py").write_text("import importlib\n"
                                                  "def f():\n    return importlib.import_module('markbench.worlds.tiny')\n")
    (tmp_path / "bench" / "runner.py").write_text("")
    (tmp_path / "bench" / "loader.py").write_text("from importlib import import_module as im\nfrom markbench import worlds\n"
                                                  "def f():\n    im(name='markbench.reports.html')\n"
                                                  "    return im('.defenses.x', 'markbench')\n")
    (tmp_path / "bench" / "measures" / "p.py").write_text("from .. import runner, stats\nfrom markbench import param\n")
    found = violations(tmp_path)
    assert found == sorted([
        "attacks/a.py:1: plugin imports the harness module bench.stages",
        "bench/measures/q.py:3: plugin imports the harness module bench.runner",
        "bench/measures/p.py:1: plugin imports the harness module bench.runner",
        "bench/loader.py:2: bench imports worlds", "bench/loader.py:4: bench imports reports.html",
        "bench/loader.py:5: bench imports defenses.x",
        "bench/models.py:3: bench imports worlds.tiny",
        "bench/cache.py:1: bench imports worlds.tiny",
        "bench/cli.py:2: bench imports reports.html",
        "bench/sub/m.py:1: bench imports defenses",
        "defenses/mine.py:2: plugin imports the harness module bench.runner",
        "reports/r.py:1: reports imports defenses.sleepermark",
    ])


def world_names() -> set[str]:
    """Every name the registered worlds answer to: their own, their models', CLIP scorers' and autoencoders', and the
    tiny world's command ``zoo``."""
    from markbench.world import all_worlds

    names = {"zoo"}
    for w in all_worlds():
        names.update([w.name, *w.models(), *w.clip_models, *w.autoencoders()])
    return names


#: the only places the core may spell a world's name: named defaults, each looked up through the world registry
#: like any other value (file -> the module-level constant that holds it)
CORE_DEFAULTS = {
    "bench/config.py": "DEFAULT_PROMPT_SET",            # the prompt set of a config that names none
    "bench/measures/clip_score.py": "DEFAULT_CLIP_MODEL",  # the CLIP scorer a world registers under this name
    "bench/testing.py": "TEST_MODEL",                   # the plugin contract suite's SD-architecture model
}
#: keyword arguments whose strings are prose for people (a parameter's doc, argparse's help texts)
_PROSE_KEYWORDS = ("doc", "help", "description", "epilog")


def world_names_in_core(root: Path, names: set[str] | None = None) -> list[str]:
    """Every string in the core's code (not its docstrings, parameter docs, help texts or ``__all__``) that spells a
    world's name (:func:`world_names`, any case, delimited by anything but a letter or digit), outside the named
    defaults of :data:`CORE_DEFAULTS`: a comparison, a tuple, a dict key, a path or a local constant with such a name
    is a special case, however it is written."""
    names = world_names() if names is None else names
    pattern = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
                         + r")(?![a-z0-9])", re.I)
    found = []
    for f in sorted((root / "bench").rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        tree = ast.parse(f.read_text(encoding="utf-8"))
        allowed: set[int] = set()
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                allowed.add(id(body[0].value))  # a docstring
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                allowed.add(id(node.value))  # a bare string (an attribute's docstring)
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Name) and node.func.id == "param":
                    allowed.update(id(c) for a in node.args[1:] for c in ast.walk(a))  # the doc, positional
                allowed.update(id(c) for k in node.keywords if k.arg in _PROSE_KEYWORDS for c in ast.walk(k.value))
            if isinstance(node, ast.Assign) and node in tree.body:
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if CORE_DEFAULTS.get(rel) in targets or "__all__" in targets:
                    allowed.update(id(c) for c in ast.walk(node.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed \
                    and pattern.search(node.value):
                found.append(f"{rel}:{node.lineno}: {node.value[:60]!r}")
    return sorted(found)


def test_the_core_names_no_world():
    """Worlds are looked up, never special-cased: the core spells no world's name but in its named defaults."""
    assert world_names_in_core(ROOT) == []


def test_the_world_name_check_fails_on_a_deliberate_violation(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "models.py").write_text(textwrap.dedent('''\
        """Loads models (a docstring may say tiny-sd)."""
        T = "tiny-sd"
        def load(name):
            if name in ("tiny-sd", "tiny-sd-rt"):
                return 1
            return {"micro-sd": 3}.get(name) or name.startswith("tiny:")
        '''))
    (tmp_path / "bench" / "config.py").write_text('DEFAULT_PROMPT_SET = "micro:shapes"\nOTHER = "zoo"\n'
                                                  'PATH = "worlds/tiny/prebuilt"\nMOD = "markbench.worlds.Tiny.x"\n'
                                                  'SD = "sd-1.5"\nHELP = dict(help="tiny-sd is fine in help text")\n')
    names = {"tiny", "tiny-sd", "tiny-sd-rt", "micro", "micro-sd", "sd", "sd-1.5", "zoo"}
    assert world_names_in_core(tmp_path, names) == [
        "bench/config.py:2: 'zoo'", "bench/config.py:3: 'worlds/tiny/prebuilt'",
        "bench/config.py:4: 'markbench.worlds.Tiny.x'", "bench/config.py:5: 'sd-1.5'",
        "bench/models.py:2: 'tiny-sd'", "bench/models.py:4: 'tiny-sd'", "bench/models.py:4: 'tiny-sd-rt'",
        "bench/models.py:6: 'micro-sd'", "bench/models.py:6: 'tiny:'",
    ]


def test_architecture_doc_states_the_checked_rule():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "A lower layer never imports a higher one" in text and "tests/test_layers.py" in text


def test_a_relative_import_resolves_to_its_package(tmp_path):
    (tmp_path / "bench" / "measures").mkdir(parents=True)
    f = tmp_path / "bench" / "measures" / "x.py"
    f.write_text(textwrap.dedent("""\
        from . import y
        from .. import world
        from ..stats import z
        """))
    assert [m for _, m in _imports_rel(tmp_path, f.relative_to(tmp_path))] == [
        "bench.measures", "bench", "bench.stats"]


def private_imports(root: Path) -> list[str]:
    """Every plugin file that reaches into another plugin module's private names: ``from defenses.x import _name``,
    or ``x.Class._method`` / ``x._name`` on a module or class imported from another plugin module."""
    found: list[str] = []
    for package in ("defenses", "attacks"):
        for f in sorted((root / package).rglob("*.py")):
            rel = f.relative_to(root)
            own = ".".join(rel.with_suffix("").parts)
            tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(rel))
            foreign: set[str] = set()
            for node in ast.walk(tree):
                module = folder_name(node.module or "") if isinstance(node, ast.ImportFrom) else ""
                if module and module != own and module.split(".")[0] in ("defenses", "attacks"):
                    for a in node.names:
                        if a.name.startswith("_"):
                            found.append(f"{rel}:{node.lineno}: imports {module}.{a.name}")
                        foreign.add(a.asname or a.name)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                        and isinstance(node.value, ast.Name) and node.value.id in foreign:
                    found.append(f"{rel}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return sorted(set(found))


def test_no_plugin_uses_another_plugins_private_names():
    assert private_imports(ROOT) == []


def test_the_private_name_check_fails_on_a_deliberate_violation(tmp_path):
    for pkg in ("defenses", "attacks"):
        (tmp_path / pkg).mkdir()
    (tmp_path / "defenses" / "a.py").write_text("from markbench.defenses.b import B, _helper\nx = B._encode(1)\n")
    assert private_imports(tmp_path) == ["defenses/a.py:1: imports defenses.b._helper",
                                         "defenses/a.py:2: uses B._encode"]


#: the tests and scripts that test or time the harness itself, and may therefore drive its stages directly (a stage
#: environment, ``run_stage``): the runner's executor protocol, the environment's secret gating per threat tier and
#: the model it hands an attack, the harness-overhead benchmark, and the probes that replay one stage. Every other test,
#: benchmark and probe goes through the public API and ``markbench.testing``
HARNESS_USERS = ("tests/test_runner.py", "tests/test_threat_tiers.py", "tests/test_removal_attacks.py",
                 "benchmarks/overhead.py", "experiments/unlearn_probe.py", "experiments/trigger_search_probe.py")


def stage_imports(root: Path) -> list[str]:
    """Files of tests/, benchmarks/ and experiments/ that import ``markbench.stages`` and are not in
    :data:`HARNESS_USERS`."""
    found = []
    for top in ("tests", "benchmarks", "experiments"):
        for f in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            rel = f.relative_to(root)
            if rel.as_posix() in HARNESS_USERS or rel.as_posix() == "tests/test_layers.py":  # its own fixtures
                continue
            found += [f"{rel.as_posix()}:{line}" for line, name in _imports_rel(root, rel)
                      if name == "bench.stages" or name.startswith("bench.stages.")]
    return found


def test_only_the_harness_tests_drive_stages_directly():
    assert stage_imports(ROOT) == []


def test_the_stage_import_check_fails_on_a_deliberate_violation(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_my_attack.py").write_text("def f():\n    from markbench.stages import StageEnv\n")
    (tmp_path / "tests" / "test_runner.py").write_text("from markbench.stages import run_stage\n")
    assert stage_imports(tmp_path) == ["tests/test_my_attack.py:2"]


def unlisted_scripts(root: Path) -> list[str]:
    """Scripts of benchmarks/ and experiments/ that their folder's README.md does not name: a benchmark without its
    target, or a probe without what it measures, is where results drift away from the docs."""
    found = []
    for top in ("benchmarks", "experiments"):
        readme = (root / top / "README.md").read_text(encoding="utf-8") if (root / top / "README.md").exists() else ""
        for f in sorted((root / top).rglob("*")):
            rel = f.relative_to(root)
            spelled = (rel.as_posix(), ".".join(rel.with_suffix("").parts))  # benchmarks/x.py or experiments.x
            if f.suffix in (".py", ".sh") and f.name != "__init__.py" and "__pycache__" not in f.parts \
                    and not any(name in readme for name in spelled):
                found.append(rel.as_posix())
    return found


def test_every_benchmark_and_probe_is_listed_in_its_readme():
    assert unlisted_scripts(ROOT) == []


def test_the_listing_check_fails_on_an_unlisted_script(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "README.md").write_text("| `python benchmarks/speed.py` | the probe's ratio |\n")
    (tmp_path / "benchmarks" / "speed.py").write_text("")
    (tmp_path / "benchmarks" / "probe.py").write_text("")  # its name is in the text, but not as a script
    assert unlisted_scripts(tmp_path) == ["benchmarks/probe.py"]
