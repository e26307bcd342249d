"""Image-caption datasets for attacks and defences that train (fine-tuning, DreamBooth, VAE decoder ...).

A dataset spec is either
* ``<world>:<name>``: a world's dataset (:mod:`bench.world`; e.g. the tiny world's procedural domain ``tiny:train``,
  ``tiny:heldout``, ``tiny:style``, ``tiny:subject``, generated deterministically from a seed, no files needed), or
* a folder of images (``.png``/``.jpg``/``.jpeg``/``.webp``) with a caption each: ``name.txt`` beside ``name.png``,
  or one ``captions.jsonl`` with ``{"file": ..., "text": ...}`` lines.

Images come back as float ``[N, 3, H, W]`` in ``[0, 1]``, resized (bicubic, antialiased) to the requested size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def load_image_captions(spec: str, n: int, height: int, width: int, seed: int = 0
                        ) -> tuple[torch.Tensor, list[str]]:
    from .world import is_dataset_spec, load_dataset

    if is_dataset_spec(spec):
        images, captions = load_dataset(spec, n, seed)
    else:
        images, captions = _load_folder(Path(spec).expanduser(), n)
    if images.shape[-2:] != (height, width):
        images = torch.nn.functional.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                                                 align_corners=False).clamp(0, 1)
    return images, captions


def _load_folder(folder: Path, n: int) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image

    if not folder.is_dir():
        raise UserError(f"dataset {str(folder)!r}: no such folder (expected '<world>:<name>' or a folder of images "
                        f"with captions)")
    pairs: list[tuple[Path, str]] = []
    index = folder / "captions.jsonl"
    if index.exists():
        for line in index.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                pairs.append((folder / rec["file"], rec["text"]))
    else:
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in _EXTS:
                txt = f.with_suffix(".txt")
                if not txt.exists():
                    raise UserError(f"dataset {str(folder)!r}: image {f.name} has no caption file {txt.name}")
                pairs.append((f, txt.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise UserError(f"dataset {str(folder)!r}: no images found ({', '.join(_EXTS)})")
    pairs = pairs[:n]
    size = None
    arrays = []
    for f, _ in pairs:
        img = Image.open(f).convert("RGB")
        if size is None:
            size = img.size
        arrays.append(np.asarray(img.resize(size, Image.BICUBIC)))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
    return images, [c for _, c in pairs]
