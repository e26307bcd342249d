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


# -- the held-out downstream loss ------------------------------------------------------------------------------------

#: The held-out loss protocol (docs/calibration.md): the task's held-out images (a world's dataset drawn with seed
#: ``data_seed``: the attacks train on seed 0's draw; a folder: the images after the ones the attack trains on),
#: ``repeats`` draws of timesteps and noise from a generator seeded with ``noise_seed``, the same for every model.
#: Part of the key of every ``downstream_loss`` stage: change a value here and only those stages recompute.
LOSS_PROTOCOL = {"data_seed": 1, "noise_seed": 1234, "repeats": 4, "version": 1}


def heldout_data(dataset: str, n: int, height: int, width: int, skip: int = 0, data_seed: int = 1):
    """``(images [N,3,H,W] in [0,1], captions)``: the held-out split of a downstream dataset, or None when it has
    none. A world's dataset (``"<world>:<name>"``): ``n`` items drawn with ``data_seed`` (the attacks draw seed 0);
    a folder: the up to ``n`` images that follow the first ``skip`` (the ones an attack of ``num_images = skip``
    trains on), in the folder's order."""
    from .data import load_image_captions
    from .world import is_dataset_spec

    if is_dataset_spec(dataset):
        return load_image_captions(dataset, n, height, width, seed=data_seed)
    images, captions = load_image_captions(dataset, skip + n, height, width)
    if images.shape[0] <= skip:
        return None
    return images[skip:], list(captions[skip:])


def heldout_loss(pipe, images, captions: list[str], noise_seed: int = 1234, repeats: int = 4,
                 chunk: int = 16):
    """Per-image denoising loss ``[N]`` of ``pipe`` on held-out images: VAE posterior-mean latents, the captions'
    text-encoder states, ``repeats`` draws of timesteps and noise from ``torch.Generator().manual_seed(noise_seed)``
    (the same draws for every model: differences between models are paired), UNet in eval mode. Lower is better:
    the model predicts the noise of the task's unseen images better (:func:`bench.training.fixed_noise_losses`)."""
    import torch

    from .training import encode_images, encode_prompts, fixed_noise_losses

    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            lat = encode_images(pipe, images)
            cond = encode_prompts(pipe, captions).to(lat)
            g = torch.Generator().manual_seed(int(noise_seed))
            return fixed_noise_losses(unet, pipe.scheduler, lat, cond, g, repeats=repeats, chunk=chunk)
    finally:
        if was_training:
            unet.train()
