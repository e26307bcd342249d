"""Feature extraction shared by the image-set metrics (FID / KID's Inception, CLIP score's image embeddings).

Two layers of reuse, both keyed by content:

* within a run, ``ctx.shared`` (each metric's own dict) keeps what it computed;
* across runs and output folders, ``ctx.features`` (the harness's :class:`bench.cache.FeatureCache`: entries in the
  artifact store, beside the image sets' own) keeps the features themselves, keyed by the extractor's identity
  (:func:`extractor_identity`: the network's name, a SHA-256 of its weights, its preprocessing, batch size, device
  type and the torch version: everything that can change a feature's bits) and the image set's content key
  (:func:`tensor_digest`: a SHA-256 of the pixels). Features are stored exactly (the extractor's own float64 /
  float32 tensor), so a metric computed from stored features equals the one computed from fresh ones bit for bit.

``ctx.features`` is None outside a run (a metric called directly): then only the first layer applies.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from markbench.plugins import MeasureContext


def tensor_digest(images: torch.Tensor) -> str:
    """SHA-256 of an image tensor's shape, dtype and bytes: the content key of an image set."""
    t = images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (parameter and buffer names, dtypes, shapes and bytes; computed once per module
    object, kept on it) and its class: what identifies the weights of a feature extractor."""
    cached = getattr(module, "_bench_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}|".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    try:
        object.__setattr__(module, "_bench_fingerprint", digest)
    except (AttributeError, TypeError):  # a module that refuses attributes (a ScriptModule may): hash again next time
        pass
    return digest


def extractor_identity(name: str, module: torch.nn.Module, preprocess: str, batch_size: int,
                       device: str) -> dict[str, Any]:
    """What a stored feature was computed by: part of its key in the feature cache."""
    return {"extractor": name, "weights": module_fingerprint(module), "preprocess": preprocess,
            "batch_size": int(batch_size), "device": torch.device(device).type, "torch": torch.__version__}


def cached_features(ctx: MeasureContext, identity: Callable[[], dict[str, Any]], images: torch.Tensor,
                    extract: Callable[[torch.Tensor], torch.Tensor], digest: str | None = None,
                    what: str = "") -> torch.Tensor:
    """``extract(images)``, or the features stored for this set by this extractor (``ctx.features``); fresh ones are
    stored. ``identity`` is called only when there is a store (fingerprinting the weights costs a pass over them)."""
    store = getattr(ctx, "features", None)
    if store is None:
        return extract(images)
    ident = identity()
    digest = digest or tensor_digest(images)
    got = store.load(ident, digest)
    if got is not None:
        return got
    feats = extract(images)
    store.save(ident, digest, feats, images_shape=list(images.shape), what=what)
    return feats
