"""The model tests hand image attacks that declare ``needs_model``: the tiny world's trained tiny-sd when it is
built (regeneration and encoder attacks on random weights say little), else the random micro-sd."""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def tiny_or_micro() -> Any:
    from markbench.config import ModelConfig
    from markbench.models import load_pipeline
    from markbench.testing import micro_pipeline
    from markbench.worlds.tiny import TINY_SD

    if not (TINY_SD / "model_index.json").exists():
        return micro_pipeline()
    return load_pipeline(ModelConfig(builtin="tiny-sd"))


def gen(seed: int = 0):
    """A CPU generator seeded ``seed``."""
    import torch

    return torch.Generator().manual_seed(seed)


def model_fixtures():
    """The module-scoped ``pipe`` (:func:`tiny_or_micro`) and ``images`` (3 sample images, 48 px) fixtures the
    removal- and attacker-model tests share: ``pipe, images = model_fixtures()`` at a test module's top level."""
    import pytest
    from markbench.testing import sample_images

    @pytest.fixture(scope="module")
    def pipe():
        return tiny_or_micro()

    @pytest.fixture(scope="module")
    def images():
        return sample_images(3, 48)

    return pipe, images
