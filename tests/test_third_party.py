"""The third-party path, end to end: docs/plugins.md's example package installed as a fake distribution (a
dist-info folder with entry_points.txt on sys.path), next to a broken one whose entry point names a missing
module. Every command still works, the broken plugin fails only the config that uses it, origins are shown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ENTRY_POINTS = """\
[bench.defenses]
acme_spread = acme_marks.spread:SpreadSpectrum

[bench.attacks]
acme_posterize = acme_marks.posterize:Posterize
"""


def doc_files() -> dict[str, str]:
    """The example files of docs/plugins.md: each ```python block whose first line is ``# <path>``."""
    text = (REPO / "docs" / "plugins.md").read_text()
    files = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        first, _, body = block.partition("\n")
        if first.startswith("# ") and first.endswith(".py"):
            files[first[2:].strip()] = body
    return files


def _dist(site: Path, name: str, version: str, entry_points: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def site(tmp_path) -> Path:
    site = tmp_path / "site"
    files = doc_files()
    assert {"acme_marks/posterize.py", "acme_marks/spread.py", "tests/test_contract.py"} <= set(files)
    for rel, body in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    (site / "acme_marks" / "__init__.py").write_text("")
    _dist(site, "acme-marks", "2.0", ENTRY_POINTS)
    _dist(site, "broken-plugin", "0.1", "[bench.attacks]\nghost = broken_plugin.missing:Ghost\n")
    return site


def _config(tmp_path: Path, image_attack: str) -> Path:
    from tests.conftest import MICRO_TOML

    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "acme_spread"')
    text = text.replace('name = "jpeg"\nquality = [90, 50]', f'name = "{image_attack}"\nstrength = [0.5]')
    path = tmp_path / f"{image_attack}.toml"
    path.write_text(text.format(output=tmp_path / "out"))
    return path


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "COLUMNS": "250"}


def test_installed_plugins_listed_with_origin_and_a_broken_one_contained(site, tmp_path):
    ok, bad = _config(tmp_path, "acme_posterize"), _config(tmp_path, "ghost")
    script = textwrap.dedent(f"""
        import sys
        from markbench.cli import main
        codes = [main(["ls"]), main(["validate", {str(ok)!r}]), main(["validate", {str(bad)!r}]),
                 main(["run", "--dry-run", "--config", {str(bad)!r}])]
        print("CODES", codes)

        # the documented defence is a working watermark (loaded as installed: through its entry point)
        import torch
        from markbench.registries import defenses, image_attacks
        from markbench.testing import make_context, quantize, sample_images
        d = defenses.get("acme_spread")()
        images = sample_images(16, 64)
        secret = d.embed(None, make_context(0)).secret
        marked = quantize(d.mark(images, secret, make_context(1)))
        jpeg = image_attacks.get("jpeg")(quality=75).apply(marked, torch.Generator())
        acc = [float((d.detect(secret, x, make_context(2)).bits == secret.tensors["message"]).float().mean())
               for x in (marked, jpeg, images)]
        print("ACCURACY", *acc, "PSNR", float(10 * torch.log10(1 / ((marked - images) ** 2).mean())))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(site), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CODES [0, 0, 2, 2]" in out.stdout  # ls and the config that does not use it work; the other is refused
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, out.stderr  # once, although two registries read the group and three commands ran
    assert "broken-plugin 0.1" in warnings[0] and "broken_plugin.missing:Ghost" in warnings[0]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(out.stderr.strip().splitlines()) == 3  # one sentence per refused command
    for error in errors:
        assert f"{bad}: image_attacks" in error and "image attack 'ghost' cannot be used" in error
        assert "broken-plugin 0.1" in error and "No module named 'broken_plugin'" in error
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.count("│") >= 3}
    assert "[from acme-marks 2.0]" in rows["acme_posterize"]  # escaped: rich does not swallow it as markup
    assert "[from acme-marks 2.0]" in rows["acme_spread"]  # decorated in its package and an entry point
    assert "[from" not in rows["jpeg"] and "ghost" not in rows
    # docs/plugins.md's spread-spectrum example: every bit back from marked 8-bit images (also after JPEG at quality
    # 75), about half from unmarked ones (512 bits: within about 3.4 standard deviations), at about 30 dB PSNR
    words = out.stdout[out.stdout.index("ACCURACY"):].split()
    marked, jpeg, clean, psnr = float(words[1]), float(words[2]), float(words[3]), float(words[5])
    assert marked == 1.0 and jpeg == 1.0 and 0.35 < clean < 0.65 and 28.0 < psnr < 33.0


@pytest.mark.slow
def test_the_package_runs_the_contract_suite_on_its_own_plugins(site):
    """docs/plugins.md's tests/test_contract.py, run by pytest in the package's folder."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py"],
                         cwd=site, env=_env(site), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    from markbench import Defense, ImageAttack
    from markbench.testing import CHECKS

    # every image-attack check and every defence check of the suite, counted from it (the forgery check made 11)
    assert f"{len(CHECKS[ImageAttack]) + len(CHECKS[Defense])} passed" in out.stdout



def test_broken_command_packages_are_one_warning_each_and_every_command_still_works(tmp_path):
    """Entry points of the group bench.commands that name a missing module, a module whose own import fails, or a
    module whose add_parsers raises: each is one warning naming its package; `bench ls` and `validate` work."""
    site = tmp_path / "site"
    (site / "cmdpkg").mkdir(parents=True)
    (site / "cmdpkg" / "__init__.py").write_text("")
    (site / "cmdpkg" / "needs_dep.py").write_text("import no_such_dependency_at_all\n")
    (site / "cmdpkg" / "raises.py").write_text("def add_parsers(sub, cfg_args):\n    raise RuntimeError('boom')\n")
    _dist(site, "cmd-plugins", "0.3", "[bench.commands]\nmissing = cmdpkg.missing\nneeds_dep = cmdpkg.needs_dep\n"
                                       "raises = cmdpkg.raises\n")
    from tests.conftest import MICRO_TOML

    config = tmp_path / "c.toml"
    config.write_text(MICRO_TOML.format(output=tmp_path / "out"))
    script = textwrap.dedent(f"""
        from markbench.cli import main
        print("CODES", [main(["ls", "metrics"]), main(["validate", {str(config)!r}, "--no-model"])])
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(site), capture_output=True,
                         text=True, timeout=300)
    assert "CODES [0, 0]" in out.stdout, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, out.stderr  # once each, although two commands ran
    for name, why in (("missing", "No module named 'cmdpkg.missing'"),
                      ("needs_dep", "No module named 'no_such_dependency_at_all'"), ("raises", "boom")):
        line = [w for w in warnings if f"'{name} = cmdpkg.{name}' of cmd-plugins 0.3" in w]
        assert len(line) == 1 and why in line[0], warnings
