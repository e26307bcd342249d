"""The tiny world's model zoo: the domain generator, the training of its models, and the shipped artifacts.

``bench zoo build`` rebuilds every artifact from a seed; ``bench zoo info`` prints what is shipped. The built models
live in ``worlds/tiny/artifacts/`` (``tiny-sd/``: a diffusers Stable Diffusion folder; ``tiny-clip/``: an open_clip
model; ``tiny-sd-rt/vae/``: the round-trip VAE of the ``tiny-sd-rt`` variant; ``tiny-vae-ind/vae/``: an
independent VAE of tiny-sd's architecture, the attacker model ``tiny-vae-ind``; ``tiny-sd-ind/unet/``: an
independent, smaller UNet on that VAE's latent space, the attacker pipeline ``tiny-sd-ind``) with a ``manifest.json`` of sizes,
checksums, training settings and quality figures.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path(__file__).parent / "artifacts"
TINY_SD = ARTIFACTS / "tiny-sd"
TINY_SD_RT = ARTIFACTS / "tiny-sd-rt"  # only its vae/: the rest is tiny-sd's (bench.models.builtin_folder)
TINY_CLIP = ARTIFACTS / "tiny-clip"
TINY_VAE_IND = ARTIFACTS / "tiny-vae-ind"  # vae/: the independent attacker VAE (``bench zoo build --only vae-ind``)
#: unet/: the independent attacker UNet (``bench zoo build --only unet-ind``); with tiny-vae-ind's VAE and tiny-sd's
#: text encoder, tokenizer and scheduler it is the pipeline ``tiny-sd-ind``
TINY_SD_IND = ARTIFACTS / "tiny-sd-ind"
MANIFEST = ARTIFACTS / "manifest.json"


PREBUILT = ARTIFACTS / "prebuilt"


def fingerprint(model: str = "tiny-sd") -> str:
    """A short identity of one shipped model (sha256 of its rows in the manifest's file table), for cache keys.

    Only that model's files count: shipping new pre-embedded defences (``prebuilt/``) or a new tiny CLIP does not
    change the keys of stages computed on ``tiny-sd``.
    """
    import hashlib
    import json

    if not MANIFEST.exists():
        return "unbuilt"
    files = json.loads(MANIFEST.read_text()).get("files", {}).get(model, {})
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
