"""The Stable Diffusion world: SD pipelines from a local folder or the Hugging Face hub cache, and the quality
references the papers use.

``model.builtin = "sd-1.5"`` (or ``sd-1.4``, ``sd-2.1-base``) resolves, in order, to

1. ``$MARKBENCH_SD_ROOT/<name>/`` (a diffusers folder: ``model_index.json`` + components, e.g. made with
   ``huggingface-cli download <hub id> --local-dir $MARKBENCH_SD_ROOT/<name>``), then
2. the hub id's snapshot already in the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``; looked up with
   ``local_files_only=True``: nothing is downloaded at run time).

Anything else is one sentence saying how to provide the weights (or use ``model.path`` / ``model.hub_id``
directly). The folder is then loaded by :func:`bench.models.load_pipeline_folder`, the one loading path of every
world. Its fingerprint (cache keys) hashes the folder's file names, sizes and modification times.

Quality references: ``clip_score`` with ``model = "sd-world"`` is open_clip ViT-L-14 with OpenAI's weights (the
text tower SD 1.x conditions on; give ``pretrained`` a local checkpoint file offline); FID against a folder of real
images (COCO val2014 or val2017, 5k-30k images) with ``reference = "/path/to/coco"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from markbench.errors import UserError
from markbench.world import World, worlds

#: builtin name -> hub id (and the version that goes into cache keys: the hub id itself)
SD_MODELS: dict[str, str] = {
    "sd-1.4": "CompVis/stable-diffusion-v1-4",
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1-base": "stabilityai/stable-diffusion-2-1-base",
}
ROOT_ENV = "MARKBENCH_SD_ROOT"


def _hub_snapshot(hub_id: str) -> Path | None:
    """The local snapshot folder of ``hub_id`` in the Hugging Face cache, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return None
    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


@worlds.register("sd")
class StableDiffusionWorld(World):
    """Stable Diffusion 1.4 / 1.5 / 2.1-base from ``$MARKBENCH_SD_ROOT/<name>`` or the local hub cache (GPU scale)."""

    version = "1"
    params = ()

    description = "Stable Diffusion from a local folder or the Hugging Face cache (sd-1.4, sd-1.5, sd-2.1-base)"
    clip_models = ("sd-world",)

    def models(self) -> Mapping[str, str]:
        return dict(SD_MODELS)

    def model_folder(self, name: str) -> Path:
        hub_id = SD_MODELS[name]
        root = os.environ.get(ROOT_ENV, "")
        if root:
            folder = Path(root).expanduser() / name
            if (folder / "model_index.json").is_file():
                return folder
        snapshot = _hub_snapshot(hub_id)
        if snapshot is not None and (snapshot / "model_index.json").is_file():
            return snapshot
        where = f"${ROOT_ENV}/{name} ({Path(root).expanduser() / name})" if root else f"${ROOT_ENV}/{name}"
        raise UserError(f"model.builtin = {name!r}: no weights found in {where} nor in the local Hugging Face cache "
                        f"for {hub_id}; download them once with `huggingface-cli download {hub_id} --local-dir "
                        f"<folder>` and set {ROOT_ENV} to the folder's parent, or set model.path to the folder")

    def model_identity(self, name: str) -> tuple[str, ...]:
        folder = self.model_folder(name)
        parts = [SD_MODELS[name]]
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
        return tuple(parts)

    def clip_scorer(self, model: str, pretrained: str | None, device: str, batch_size: int) -> Any:
        from markbench.measures.clip_score import open_clip_scorer

        return open_clip_scorer("ViT-L-14", pretrained or "openai", device, batch_size)
