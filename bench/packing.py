"""Packing a defence's networks into its :class:`bench.Secret` tensors and back, and a digest of a secret.

A secret is a flat ``{name: tensor}`` dict (stored as safetensors): a module's state dict goes in under a prefix
(:func:`state_tensors`) and comes back into a freshly built module (:func:`load_prefixed`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def state_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def load_prefixed(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)


def digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(sorted((meta or {}).items())).encode())
    return h.hexdigest()
