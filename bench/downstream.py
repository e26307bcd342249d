"""Downstream tasks: what a fine-tuning attack was for, and whether the attacked model learnt it (attacker utility).

A fine-tuning attack on a world's dataset (``tiny:style``: a style the base never saw; ``tiny:subject``: a new
subject bound to a rare token) succeeds for the attacker when the fine-tuned model's images show it. Only the world
that made the dataset can tell: :meth:`bench.world.World.downstream_task` says whether a dataset is a task it can
recognise, and the task itself gives its held-out captions and judges images (the tiny world's zero-shot CLIP,
:mod:`worlds.tiny.downstream`). A dataset no world recognises (a folder of the user's own images) has no task: then
no downstream utility is measured, only the quality kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class DownstreamTask:
    """A downstream goal a world can recognise: ``kind`` is ``"style"`` or ``"subject"`` (with its ``token``).

    ``captions(n)`` gives ``n`` held-out captions of the task (the same for every call; the attacks train on other
    draws) and ``hits(images, captions)`` says per image whether it shows the task (bool ``[N]``).
    """

    dataset: str
    kind: str
    token: str = ""
    captions: Callable[[int], list[str]] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    hits: Callable[[Any, list[str]], np.ndarray] = field(default=None, compare=False, repr=False)  # type: ignore

    @property
    def description(self) -> str:
        if self.kind == "style":
            return "the new style"
        return f"the new subject '{self.token}'"


def task_of(dataset: str | None, token: str | None = None) -> DownstreamTask | None:
    """The recognisable task of a dataset spec ``"<world>:<name>"`` (e.g. ``tiny:style``), else None."""
    from .world import get_world, split_spec

    parts = split_spec(dataset) if dataset else None
    if parts is None:
        return None
    return get_world(parts[0]).downstream_task(parts[1], token)


def eval_captions(task: DownstreamTask, n: int) -> list[str]:
    """``n`` held-out captions of the task, the same for every call."""
    return list(task.captions(n))


def recognised(task: DownstreamTask, images, captions: list[str]) -> np.ndarray:
    """Per image, whether it shows the task's style or subject (bool ``[N]``)."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"downstream recognition: {images.shape[0]} images but {len(captions)} captions")
    return np.asarray(task.hits(images, captions), dtype=bool)
