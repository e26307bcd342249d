"""Selecting the weight tensors model-level attacks act on."""

from __future__ import annotations

from typing import Iterator

import torch

SCOPES = ("unet", "text_encoder", "vae", "vae_decoder", "all")


def layer_weights(pipe, scope: str = "unet") -> Iterator[tuple[str, torch.nn.Module, torch.nn.Parameter]]:
    """``(qualified name, module, weight)`` of every Linear and Conv layer in ``scope`` (biases and norms excluded,
    as in the pruning and quantization literature)."""
    roots = {"unet": ["unet"], "text_encoder": ["text_encoder"], "vae": ["vae"], "vae_decoder": ["vae"],
             "all": ["unet", "text_encoder", "vae"]}[scope]
    for comp in roots:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if scope == "vae_decoder" and not (name.startswith("decoder") or name.startswith("post_quant_conv")):
                continue
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and \
                    getattr(module, "weight", None) is not None:
                yield f"{comp}.{name}.weight", module, module.weight
