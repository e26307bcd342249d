"""Content-addressed artifact store.

Every stage output lives in ``<cache>/<key[:2]>/<key>/``: ``tensors.safetensors`` (tensors and model overrides),
``images/00000.png`` ... (8-bit PNG), ``meta.json`` (what made it: stage, plugin, parameters, inputs, timings,
costs). A folder is written under a temporary name and renamed into place, so a crash never leaves a half-written
artifact behind, and two workers writing the same key cannot corrupt it.

Read-only *fallback* stores sit behind the writable one: a world ships the embed stages of its pre-embedded
defences there (:meth:`bench.world.World.prebuilt_stores`; the tiny world's ``worlds/tiny/artifacts/prebuilt``,
written by ``bench zoo embed``), so ``bench run`` reads a shipped watermarked model instead of training it. A key is looked up in the writable store first, then in each
fallback; nothing is ever written to a fallback. Because keys hash every input (base-model checksums, plugin,
parameters, version, seed), a shipped artifact is only ever used for exactly the stage that made it.
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
    def __init__(self, root: str | os.PathLike, fallbacks: tuple[str | os.PathLike, ...] = ()):
        self.root = Path(root)
        self.fallbacks = tuple(Path(f) for f in fallbacks)

    def own_path(self, key: str) -> Path:
        """Where this store writes ``key``."""
        return self.root / key[:2] / key

    def path(self, key: str) -> Path:
        """Where ``key`` is: this store's copy, else the first fallback's, else where it would be written."""
        own = self.own_path(key)
        if (own / "meta.json").exists():
            return own
        for root in self.fallbacks:
            p = root / key[:2] / key
            if (p / "meta.json").exists():
                return p
        return own

    def exists(self, key: str) -> bool:
        return (self.path(key) / "meta.json").exists()

    def shipped(self, key: str) -> bool:
        """Whether ``key`` is read from a fallback (a shipped artifact) rather than computed here."""
        return self.exists(key) and self.path(key) != self.own_path(key)

    def write(self, key: str, *, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
              images: torch.Tensor | None = None) -> Path:
        from PIL import Image
        from safetensors.torch import save_file

        if self.exists(key):
            return self.path(key)
        final = self.own_path(key)
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


def shipped_stores() -> tuple[Path, ...]:
    """The read-only stores the worlds ship (pre-embedded defences; :func:`bench.world.prebuilt_stores`).

    ``MARKBENCH_NO_PREBUILT=1`` turns them off (every stage is then computed here, e.g. to re-embed from scratch).
    """
    if os.environ.get("MARKBENCH_NO_PREBUILT", "") not in ("", "0"):
        return ()
    from .world import prebuilt_stores

    return prebuilt_stores()
