"""The micro world: a Stable-Diffusion-architecture pipeline with random weights, for plumbing tests.

``model.builtin = "micro-sd"`` is built from configs under a fixed seed (SD 1.x's component names and module layout
at micro width), written once with ``save_pretrained`` under ``$MARKBENCH_HOME/models`` and then loaded from that
folder like any Stable Diffusion folder. Its images are noise-like: it proves plumbing, not quality. Its prompt set
``micro:shapes`` (legacy ``builtin:micro``) holds 64 captions of the tiny world's grammar. This file is the whole
world: a third world needs nothing more (a class, a decorator, an entry in the registry or an entry point).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from markbench.world import World, worlds

#: bump when the builder changes: the version is part of every cache key on micro-sd
MICRO_SD_VERSION = "1"

_SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "hexagon")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_BACKGROUNDS = ("grey", "blue", "green", "white", "black", "brown", "pink", "teal")
_SIZES = ("small", "medium", "large")


def shape_captions(n: int) -> tuple[str, ...]:
    """``n`` captions cycling through shapes, colours, backgrounds and sizes."""
    out = []
    for i in range(n):
        shape = _SHAPES[i % len(_SHAPES)]
        colour = _COLOURS[(i * 3 + 1) % len(_COLOURS)]
        bg = _BACKGROUNDS[(i * 5 + 2) % len(_BACKGROUNDS)]
        if bg == colour:
            bg = _BACKGROUNDS[(i * 5 + 3) % len(_BACKGROUNDS)]
        size = _SIZES[i % len(_SIZES)]
        out.append(f"a {size} {colour} {shape} on a {bg} background")
    return tuple(out)


def build_micro_sd(seed: int = 0, sample_size: int = 64):
    """A Stable-Diffusion-architecture pipeline at micro width, randomly initialised under ``seed``.

    Same component names and module layout as SD 1.x (down/up blocks with cross-attention transformers), so code
    written for Stable Diffusion applies unchanged.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from markbench.models import clip_tokenizer

    torch.manual_seed(seed)  # builder only: the artifact is then fixed on disk
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=16, sample_size=sample_size,
    )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=sample_size // factor, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        projection_dim=32,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@worlds.register("micro")
class MicroWorld(World):
    """Random-weight SD-architecture pipeline (``micro-sd``) and the ``micro:shapes`` prompt set: plumbing only."""

    version = "1"
    params = ()

    description = "micro-sd: Stable Diffusion's architecture at micro width, random weights (plumbing tests)"
    legacy_prompt_sets = {"micro": "shapes"}

    def models(self) -> Mapping[str, str]:
        return {"micro-sd": MICRO_SD_VERSION}

    def model_folder(self, name: str) -> Path:
        from markbench.models import markbench_home

        folder = markbench_home() / "models" / f"{name}-v{MICRO_SD_VERSION}"
        if not (folder / "model_index.json").exists():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            build_micro_sd().save_pretrained(tmp)
            if not folder.exists():
                tmp.replace(folder)
            else:  # another process made it first
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def check_model(self, name: str) -> Path | None:
        return None  # built from configs on first use: nothing can be missing

    def prompt_sets(self) -> Mapping[str, Callable[[], Sequence[str]]]:
        return {"shapes": lambda: shape_captions(64)}
