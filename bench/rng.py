"""Random streams derived from a stage's ``torch.Generator`` (no global seeding anywhere: DESIGN "Randomness").

:func:`sub_generator` forks a child stream; :class:`forked_global_rng` and :func:`seeded` run code that draws from
torch's *global* RNG by design (parameter initialisation, ``nn.Dropout`` in train mode) under a seed taken from the
caller's generator, restoring the global state afterwards; :func:`global_rng_from` does the same on a device.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn


def sub_generator(gen: torch.Generator) -> torch.Generator:
    """A child generator seeded from ``gen`` (every random stream derives from the stage's generator)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))


class forked_global_rng:
    """Context manager: the global RNG is forked, seeded from ``gen`` and restored on exit, so library code that
    draws from it (e.g. dropout layers in train mode) is deterministic and nothing outside is disturbed."""

    def __init__(self, gen: torch.Generator):
        self.seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        self._fork = torch.random.fork_rng(devices=[])

    def __enter__(self):
        self._fork.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def seeded(gen: torch.Generator, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module whose default initialisation is drawn from a seed taken from ``gen``, under a forked global
    RNG (restored afterwards): nothing global is seeded or disturbed."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@contextlib.contextmanager
def global_rng_from(gen: torch.Generator, device: Any):
    """Within the block, the global RNGs (CPU and ``device``) are seeded from ``gen`` and restored afterwards: for
    what draws from the global RNG by design (parameter initialisation, ``nn.Dropout``)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
