"""Content-addressed artifact store.

Every stage output lives in ``<cache>/<key[:2]>/<key>/``: ``tensors.safetensors`` (tensors and model overrides),
``images/00000.png`` ... (8-bit PNG), ``meta.json`` (what made it: stage, plugin, parameters, inputs, timings,
costs). A folder is written under a temporary name and renamed into place, so a crash never leaves a half-written
artifact behind, and two workers writing the same key cannot corrupt it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch


def stable_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys; floats by repr)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_default, separators=(",", ":")).encode()).hexdigest()


def _default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "value"):
        return o.value
    raise TypeError(f"not hashable for a cache key: {o!r}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float ``[N,3,H,W]`` in [0,1] -> uint8 ``[N,H,W,3]`` (round to nearest)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float().div(255)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """What an image is after a round trip through an 8-bit file."""
    return from_uint8(to_uint8(images))


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def exists(self, key: str) -> bool:
        return (self.path(key) / "meta.json").exists()

    def write(self, key: str, *, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
              images: torch.Tensor | None = None) -> Path:
        from PIL import Image
        from safetensors.torch import save_file

        final = self.path(key)
        if self.exists(key):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            if tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          str(tmp / "tensors.safetensors"))
            if images is not None:
                (tmp / "images").mkdir()
                for i, arr in enumerate(to_uint8(images).numpy()):
                    Image.fromarray(arr).save(tmp / "images" / f"{i:05d}.png", compress_level=1)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            try:
                os.replace(tmp, final)
            except OSError:  # another worker won the race: its copy is identical by construction
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads((self.path(key) / "meta.json").read_text())

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        f = self.path(key) / "tensors.safetensors"
        return load_file(str(f)) if f.exists() else {}

    def images(self, key: str) -> torch.Tensor:
        from PIL import Image

        files = sorted((self.path(key) / "images").glob("*.png"))
        arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        return from_uint8(torch.from_numpy(arr))

    def image_paths(self, key: str) -> list[Path]:
        return sorted((self.path(key) / "images").glob("*.png"))
