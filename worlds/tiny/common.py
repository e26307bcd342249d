"""Shared pieces of the zoo's training scripts: cached datasets, checkpoints that resume, per-step seeding, logging.

Every training loop draws step ``k``'s batch and noise from generators seeded by ``(seed, k)``, so a run that is
stopped and resumed from a checkpoint follows the same trajectory as one that never stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import shapes


def default_work_dir() -> Path:
    """Where a build keeps its datasets, checkpoints and logs: ``$MARKBENCH_HOME/zoo-build``."""
    from markbench.models import markbench_home

    return markbench_home() / "zoo-build"


def cached_dataset(work: Path, split: str, n: int, seed: int, log: Callable[[str], None] | None = None
                   ) -> tuple[np.ndarray, list[str]]:
    """``n`` images of ``split`` (uint8 NHWC) and captions, rendered once and kept in ``work/data``."""
    folder = Path(work) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{split}-n{n}-s{seed}"
    npy, txt = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if npy.exists() and txt.exists():
        return np.load(npy), json.loads(txt.read_text())
    if log:
        log(f"rendering {n} {split} images (seed {seed})")
    images, captions, _ = shapes.make_dataset(split, n, seed)
    tmp = folder / f".{stem.name}.{os.getpid()}.npy"
    np.save(tmp, images)
    os.replace(tmp, npy)
    txt.write_text(json.dumps(captions))
    return images, captions


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(step), int(stream)])


def step_generator(seed: int, step: int, stream: int = 0):
    import torch

    return torch.Generator().manual_seed(int(step_rng(seed, step, stream + 1000).integers(2 ** 62)))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    import torch

    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors, dicts, lists, numbers only


def lr_at(step: int, base: float, warmup: int, total: int, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_frac * base`` at ``total``."""
    import math

    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class Logger:
    """Appends timestamped lines to a log file and, unless quiet, to stderr."""

    path: Path | None = None
    quiet: bool = False
    t0: float = field(default_factory=time.time)

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:7.0f}s] {msg}"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


class NullBar:
    """The progress-bar interface the training loops call (rich's, or this no-op)."""

    def start(self, name: str, total: int, completed: int = 0) -> None: ...

    def advance(self, name: str, completed: int, info: str = "") -> None: ...

    def stop(self, name: str) -> None: ...


class RichBar(NullBar):
    def __init__(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 transient=False)
        self.tasks: dict[str, Any] = {}

    def start(self, name: str, total: int, completed: int = 0) -> None:
        if not self.tasks:
            self.progress.start()
        self.tasks[name] = self.progress.add_task(name, total=total, completed=completed, info="")

    def advance(self, name: str, completed: int, info: str = "") -> None:
        self.progress.update(self.tasks[name], completed=completed, info=info)

    def stop(self, name: str) -> None:
        self.tasks.pop(name, None)
        if not self.tasks:
            self.progress.stop()


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
