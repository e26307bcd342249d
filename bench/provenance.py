"""What made a number: package versions and the git hash of the code."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("markbench", "torch", "torchvision", "diffusers", "transformers", "peft", "kornia", "torchmetrics",
            "open_clip_torch", "numpy", "scipy", "pandas", "invisible-watermark", "safetensors")


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import platform

    out["python"] = platform.python_version()
    return out


@lru_cache(maxsize=1)
def git_hash() -> str:
    """The commit of the MarkBench source tree, with ``+dirty`` when it has uncommitted changes; '' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""
