"""Only safetensors by default: a model folder whose weights are pickle files is refused, naming the file and the
opt-in; a pickle planted in a model folder is never unpickled (its payload would create a file)."""

from __future__ import annotations

import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from markbench.cli import main

from .conftest import MICRO_TOML


class _Payload:
    """Unpickling this runs ``touch <marker>``: proof of execution if the marker appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def _planted(tmp_path: Path, keep_safetensors: bool) -> tuple[Path, Path, Path]:
    from markbench.models import builtin_folder

    folder = tmp_path / "model"
    shutil.copytree(builtin_folder("micro-sd"), folder)
    marker = tmp_path / "PWNED"
    unet = folder / "unet"
    if not keep_safetensors:
        (unet / "diffusion_pytorch_model.safetensors").unlink()
    planted = unet / "diffusion_pytorch_model.bin"
    planted.write_bytes(pickle.dumps(_Payload(marker)))
    cfg = tmp_path / "bench.toml"
    cfg.write_text(MICRO_TOML.replace('builtin = "micro-sd"', f'path = "{folder}"')
                   .format(output=str(tmp_path / "out")))
    return cfg, planted, marker


def test_the_planted_payload_is_live(tmp_path):
    """The control: unpickling the planted bytes does run code (so the tests below could fail)."""
    _, planted, marker = _planted(tmp_path, keep_safetensors=False)
    pickle.loads(planted.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("command", ["validate", "run"])
def test_pickle_only_model_is_refused_naming_file_and_opt_in_and_never_unpickled(tmp_path, capsys, command):
    cfg, planted, marker = _planted(tmp_path, keep_safetensors=False)
    capsys.readouterr()
    argv = ["validate", str(cfg)] if command == "validate" else ["run", "--config", str(cfg), "--no-progress"]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(planted) in err and "model.allow_pickle = true" in err and "--allow-pickle" in err
    assert not marker.exists()


def test_opt_in_lets_a_pickle_only_folder_pass_validation(tmp_path, capsys):
    cfg, _, marker = _planted(tmp_path, keep_safetensors=False)
    assert main(["validate", str(cfg), "--allow-pickle"]) == 0
    assert not marker.exists()  # validation reads no weights


def test_pickle_beside_safetensors_is_never_read_when_loading(tmp_path):
    """With both present, the loader is told to read safetensors only: the run's model loads, the pickle stays shut."""
    from markbench.config import load_config
    from markbench.modelcheck import load_base

    cfg, planted, marker = _planted(tmp_path, keep_safetensors=True)
    pipe = load_base(load_config(cfg))
    assert pipe.unet is not None and not marker.exists()


def test_no_torch_load_without_weights_only():
    """Plugin artifacts and caches are safetensors; any torch.load in the package must pass weights_only=True."""
    import re

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for f in [f for d in ("bench", "defenses", "attacks", "reports", "benchmarks") for f in root.glob(f"{d}/**/*.py")]:
        for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text()):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{f.relative_to(root)}: {m.group(0)[:80]}")
    assert not offenders, offenders
