"""Small networks shared by the in-model defences that hide a message in the latent: a message-only secret encoder
(bits -> latent residual) and a latent decoder (latent -> bits).

SleeperMark (Wang et al., CVPR 2025) defines both; AquaLoRA (Feng et al., ICML 2024) uses the same shapes with its
own widths. One home here, so neither defence imports the other.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SecretEncoder(nn.Module):
    """Message-only secret encoder: bits -> latent residual ``delta_z`` ``[B, C, h, w]``.

    ``Linear(n_bits, r*r) - SiLU - Linear(r*r, r*r) - SiLU``, viewed as ``1 x r x r``, repeated to the latent
    channels, resized (nearest) to the latent size, then a zero-initialised 3x3 convolution (so training starts from
    ``delta_z = 0``). The paper: ``r = 32`` (hidden width 1024), upsampled to SD's 64 x 64 latent.
    ``residual_rms > 0`` (not in the paper): every residual is rescaled to that root-mean-square value, so the
    training learns its direction at a fixed size (the image terms cannot shrink it to nothing, nor the bit term
    grow it into a visible texture); the output convolution then starts small and random instead of zero.
    """

    def __init__(self, n_bits: int, latent_channels: int, latent_size: tuple[int, int], secret_res: int = 32,
                 residual_rms: float = 0.0):
        super().__init__()
        self.latent_channels = int(latent_channels)
        self.latent_size = (int(latent_size[0]), int(latent_size[1]))
        self.secret_res = int(secret_res)
        self.residual_rms = float(residual_rms)
        width = self.secret_res * self.secret_res
        self.mlp = nn.Sequential(nn.Linear(n_bits, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.conv = nn.Conv2d(self.latent_channels, self.latent_channels, 3, padding=1)
        if self.residual_rms > 0:  # a fixed-size residual has no zero start: a small random one (drawn by the caller)
            nn.init.normal_(self.conv.weight, std=1e-2)
        else:
            nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, message: torch.Tensor) -> torch.Tensor:
        x = self.mlp(message.float()).view(-1, 1, self.secret_res, self.secret_res)
        x = x.repeat(1, self.latent_channels, 1, 1)
        if (self.secret_res, self.secret_res) != self.latent_size:
            x = F.interpolate(x, size=self.latent_size, mode="nearest")
        x = self.conv(x)
        if self.residual_rms > 0:  # each message's residual rescaled to the budget: its size is fixed, not learnt
            x = x * (self.residual_rms / x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-8))
        return x


class LatentDecoder(nn.Module):
    """Latent secret decoder: latent ``[B, C, h, w]`` -> ``n_bits`` logits.

    Per entry of ``channels`` a pair of 3x3 convolutions (stride 2, then stride 1) with SELU; flatten; ``mlp_layers``
    linear layers of width ``hidden`` with SELU; dropout; a linear layer to the logits. The flatten size is computed
    from the latent shape (each stride-2 convolution maps a side ``s`` to ``ceil(s / 2)``). Paper: channels
    64-128-256-512 on SD's 4 x 64 x 64 latent (flatten 8192), hidden 2048 x 3, dropout 0.1.
    """

    def __init__(self, n_bits: int, latent_channels: int, latent_size: tuple[int, int],
                 channels: Sequence[int] = (64, 128, 256, 512), hidden: int = 2048, mlp_layers: int = 3,
                 dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, (h, w) = int(latent_channels), (int(latent_size[0]), int(latent_size[1]))
        for c in channels:
            layers += [nn.Conv2d(c_in, int(c), 3, stride=2, padding=1), nn.SELU(),
                       nn.Conv2d(int(c), int(c), 3, stride=1, padding=1), nn.SELU()]
            c_in, h, w = int(c), (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.convs = nn.Sequential(*layers)
        self.flat_features = c_in * h * w
        mlp: list[nn.Module] = []
        d = self.flat_features
        for _ in range(int(mlp_layers)):
            mlp += [nn.Linear(d, int(hidden)), nn.SELU()]
            d = int(hidden)
        mlp += [nn.Dropout(float(dropout)), nn.Linear(d, int(n_bits))]
        self.mlp = nn.Sequential(*mlp)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.convs(latent).flatten(1))


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the method, exposed for tests
# ---------------------------------------------------------------------------------------------------------------
