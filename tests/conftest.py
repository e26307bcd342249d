"""Shared fixtures: a micro config on the built-in micro pipeline (random weights, fixed seed), tiny N."""

from __future__ import annotations

import importlib.abc
import os
import sys
import textwrap
from pathlib import Path

import pytest

#: the repository's folders installed under ``markbench`` (pyproject's package-dir)
_FOLDERS = ("bench", "attacks", "defenses", "reports", "worlds")


class _FolderNameGuard(importlib.abc.MetaPathFinder):
    """Refuses a top-level import of a folder by its own name (``import reports``, ``files("reports")``).

    pytest puts the repository root on ``sys.path``, where such an import would succeed and load a second copy of
    the module beside the installed ``markbench`` one; installed, it fails. The guard makes it fail here too.
    """

    def find_spec(self, name, path=None, target=None):
        if path is None and name in _FOLDERS:
            installed = "markbench" if name == "bench" else f"markbench.{name}"
            raise ModuleNotFoundError(f"'{name}' is a folder of the repository; its installed name is '{installed}'")
        return None


if not any(isinstance(f, _FolderNameGuard) for f in sys.meta_path):
    sys.meta_path.insert(0, _FolderNameGuard())


def pytest_configure(config: pytest.Config) -> None:
    """Skip the ``slow`` tests unless asked: the default run stays a few minutes.

    ``-m`` (any expression, e.g. ``-m slow``, ``-m ""``) or a test named by its node id (``file.py::test``) turns this
    off, so a slow test named on the command line still runs.
    """
    marked = any(str(arg).startswith("-m") for arg in config.invocation_params.args)
    named = any("::" in arg for arg in config.args)
    if not marked and not named:
        config.option.markexpr = "not slow"


MICRO_TOML = """
metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]

[run]
output = "{output}"
seeds = [0]
num_images = 4
batch_size = 4
target_fprs = [1e-6, 0.1]

[model]
builtin = "micro-sd"
height = 64
width = 64
num_inference_steps = 2

[prompts]
set = "micro:shapes"

[[defenses]]
name = "none"

[[defenses]]
name = "dwtdctsvd"

[[image_attacks]]
name = "jpeg"
quality = [90, 50]
"""

#: model attacks appended to MICRO_TOML by the tests of model-attacked cells: none, a one-step LoRA, pruning
MODEL_ATTACKS_TOML = """
[[model_attacks]]
name = "none"

[[model_attacks]]
name = "lora"
steps = 1

[[model_attacks]]
name = "prune"
"""


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tests work on tiny tensors: one torch thread is as fast on an idle machine and 10x faster on a busy one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _markbench_home(tmp_path_factory):
    """Built-in models are built once per test session into a temporary MARKBENCH_HOME (unless one is set)."""
    if "MARKBENCH_HOME" not in os.environ:
        os.environ["MARKBENCH_HOME"] = str(tmp_path_factory.mktemp("markbench-home"))
    yield


def write_config(tmp_path: Path, text: str = MICRO_TOML, name: str = "bench.toml", **fmt) -> Path:
    fmt.setdefault("output", str(tmp_path / "out"))
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).format(**fmt))
    return p


@pytest.fixture
def micro_config(tmp_path) -> Path:
    return write_config(tmp_path)


def load_benchmark(name: str, folder: str = "benchmarks"):
    """A script under benchmarks/ or experiments/ (run as scripts, not imported as packages) loaded as a module, e.g.
    ``load_benchmark("aqualora_ppft_bits", "experiments")``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
