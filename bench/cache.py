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

Integrity (docs/reliability.md): ``meta.json`` records each file's size and SHA-256 (``files``) when an entry is
written. :meth:`ArtifactStore.check` (before a cached stage is reused) parses ``meta.json`` and compares every size;
:meth:`ArtifactStore.tensors` and :meth:`ArtifactStore.images` hash the bytes they read and compare. An entry that
fails raises :class:`CorruptArtifact`; the runner then moves it aside into ``<cache>/quarantine/`` (never deletes
it) and recomputes it. Entries written before hashes were recorded (and the shipped store) are checked for what can
be checked: ``meta.json`` parses, the safetensors file loads, every PNG decodes to the same size. A read-only
fallback entry is never moved: a damaged one fails its stage with one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import BenchError


#: what every key is: a SHA-256 in hex (:func:`stable_hash`)
_KEY = re.compile(r"[0-9a-f]{64}")


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


QUARANTINE = "quarantine"


class CorruptArtifact(BenchError):
    """A cache entry that does not match what was written (or cannot be read). ``key`` names the entry, ``path``
    its folder, ``readonly`` whether it sits in a read-only fallback store (then it is never moved)."""

    def __init__(self, key: str, path: Path, reason: str, readonly: bool = False):
        self.key, self.path, self.reason, self.readonly = key, Path(path), reason, readonly
        where = "shipped (read-only) artifact" if readonly else "cache entry"
        super().__init__(f"{where} {path} is damaged: {reason}")


def file_record(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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
            meta = dict(meta, files={f.relative_to(tmp).as_posix(): file_record(f.read_bytes())
                                     for f in sorted(tmp.rglob("*")) if f.is_file()})
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            try:
                os.replace(tmp, final)
            except OSError:  # another worker won the race: its copy is identical by construction
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def readonly(self, key: str) -> bool:
        """Whether ``key``'s copy sits in a read-only fallback store."""
        return self.path(key) != self.own_path(key)

    def _corrupt(self, key: str, reason: str) -> CorruptArtifact:
        return CorruptArtifact(key, self.path(key), reason, self.readonly(key))

    def meta(self, key: str) -> dict[str, Any]:
        f = self.path(key) / "meta.json"
        try:
            meta = json.loads(f.read_bytes())
        except FileNotFoundError:
            raise self._corrupt(key, "meta.json is missing") from None
        except (OSError, ValueError) as exc:
            raise self._corrupt(key, f"meta.json is not JSON ({_short(exc)})") from None
        if not isinstance(meta, dict):
            raise self._corrupt(key, "meta.json is not a JSON object")
        return meta

    def _records(self, key: str) -> dict[str, dict[str, Any]] | None:
        files = self.meta(key).get("files")
        if files is None:
            return None  # written before sizes and hashes were recorded
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise self._corrupt(key, "meta.json's file list is malformed")
        return files

    def check(self, key: str) -> None:
        """The cheap check before a cached entry is reused: ``meta.json`` parses and every recorded file is there with
        its recorded size (entries without records: ``meta.json`` parses). Raises :class:`CorruptArtifact`."""
        records = self._records(key)
        if records is None:
            return
        root = self.path(key)
        for name, rec in records.items():
            f = root / name
            try:
                size = f.stat().st_size
            except OSError:
                raise self._corrupt(key, f"{name} is missing") from None
            if size != rec.get("size"):
                raise self._corrupt(key, f"{name} has {size} bytes, {rec.get('size')} were written")

    def verify(self, key: str) -> None:
        """The full check (``bench cache verify``): :meth:`check`, then every file read and hashed (entries without
        records: tensors load, images decode)."""
        self.check(key)
        self.tensors(key)
        if (self.path(key) / "images").is_dir() or any(n.startswith("images/") for n in self._records(key) or {}):
            self.images(key)

    def _read(self, key: str, name: str, records: dict[str, Any] | None) -> bytes:
        f = self.path(key) / name
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise self._corrupt(key, f"{name} cannot be read ({_short(exc)})") from None
        if records is not None:
            rec = records.get(name)
            if rec is None:
                raise self._corrupt(key, f"{name} is not among the files recorded when it was written")
            if file_record(data) != {"size": rec.get("size"), "sha256": rec.get("sha256")}:
                raise self._corrupt(key, f"{name} does not match the size and SHA-256 recorded when it was written")
        return data

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        records = self._records(key)
        name = "tensors.safetensors"
        if records is not None and name not in records:
            return {}
        if records is None and not (self.path(key) / name).exists():
            return {}
        data = self._read(key, name, records)
        try:
            return load(data)
        except Exception as exc:
            raise self._corrupt(key, f"{name} is not a readable safetensors file ({_short(exc)})") from None

    def images(self, key: str) -> torch.Tensor:
        import io

        from PIL import Image

        records = self._records(key)
        if records is not None:
            names = sorted(n for n in records if n.startswith("images/"))
        else:
            names = [f"images/{f.name}" for f in self.image_paths(key)]
        if not names:
            raise self._corrupt(key, "it holds no images")
        arrays = []
        for name in names:
            data = self._read(key, name, records)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    arrays.append(np.asarray(im.convert("RGB")))
            except Exception as exc:
                raise self._corrupt(key, f"{name} is not a readable PNG ({_short(exc)})") from None
        if len({a.shape for a in arrays}) != 1:
            raise self._corrupt(key, "its images differ in size")
        return from_uint8(torch.from_numpy(np.stack(arrays)))

    def image_paths(self, key: str) -> list[Path]:
        return sorted((self.path(key) / "images").glob("*.png"))

    def quarantine(self, key: str) -> Path | None:
        """Move this store's copy of ``key`` aside into ``<root>/quarantine/`` (kept for inspection, never deleted
        here); the key is then missing and is recomputed. Returns where it went (None if another process moved it
        first). A fallback's copy is never moved."""
        src = self.own_path(key)
        dest = self.root / QUARANTINE / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            from .errors import UserError

            raise UserError(f"{dest.parent}: is not a folder, so the cache cannot set its damaged entry {key[:12]} "
                            f"aside; move that file away and run again") from None
        try:
            os.replace(src, dest)
        except FileNotFoundError:
            return None
        return dest

    def touch(self, key: str) -> None:
        """Record that a run used ``key`` now (its folder's modification time; ``bench cache prune --older-than``)."""
        own = self.own_path(key)
        try:
            if self.path(key) == own:
                os.utime(own)
        except OSError:
            pass

    def entries(self):
        """``(key, folder)`` of every entry of this (writable) store: folders ``<xx>/<key>`` whose name is a key (64 hex
        digits) starting with its shard's name. Anything else in the folder (a user's notes, a stray folder) is not an
        entry: verify never reports it, prune never removes it."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != 2 or not shard.is_dir() or shard.is_symlink():
                continue
            for entry in sorted(shard.iterdir()):
                if _KEY.fullmatch(entry.name) and entry.name[:2] == shard.name and entry.is_dir() \
                        and not entry.is_symlink():
                    yield entry.name, entry


class FeatureCache:
    """Features extracted from image sets (FID's Inception, CLIP's image embeddings), kept in the artifact store.

    An entry is keyed by the extractor's identity (what computed the features: network, a fingerprint of its weights,
    preprocessing, batch size, device type, torch version: a dict the metric builds) and the image set's content key
    (a SHA-256 of its pixels), so a second output folder on the same cache, a second metric over the same set (FID
    and KID, ``attacker_utility``'s FID) or a re-measured grid reads them instead of running the network again. An
    entry is an ordinary artifact (``tensors.safetensors`` with ``features``, ``meta.json`` with
    ``"kind": "features"``): written atomically, hashed, checked on read; a damaged one is quarantined and
    recomputed. Shipped (read-only) stores are read too. No stage key changes: features are not stages.
    ``reads`` / ``writes`` count this process's hits and stores (benchmarks, tests)."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self.reads = 0
        self.writes = 0

    @staticmethod
    def key(identity: dict[str, Any], digest: str) -> str:
        return stable_hash({"kind": "features", "extractor": identity, "images": digest})

    def load(self, identity: dict[str, Any], digest: str) -> torch.Tensor | None:
        """The stored features of the image set ``digest`` by ``identity``, or None (absent or damaged)."""
        key = self.key(identity, digest)
        if not self.store.exists(key):
            return None
        try:
            self.store.check(key)
            features = self.store.tensors(key).get("features")
        except CorruptArtifact as exc:
            if not exc.readonly:
                self.store.quarantine(key)
            return None
        if features is None:
            return None
        self.store.touch(key)
        self.reads += 1
        return features

    def save(self, identity: dict[str, Any], digest: str, features: torch.Tensor, **meta: Any) -> None:
        key = self.key(identity, digest)
        self.store.write(key, meta={"kind": "features", "extractor": identity, "images": digest,
                                    "shape": list(features.shape), **meta},
                         tensors={"features": features})
        self.writes += 1


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def shipped_stores() -> tuple[Path, ...]:
    """The read-only stores the worlds ship (pre-embedded defences; :func:`bench.world.prebuilt_stores`).

    ``MARKBENCH_NO_PREBUILT=1`` turns them off (every stage is then computed here, e.g. to re-embed from scratch).
    """
    if os.environ.get("MARKBENCH_NO_PREBUILT", "") not in ("", "0"):
        return ()
    from .world import prebuilt_stores

    return prebuilt_stores()
