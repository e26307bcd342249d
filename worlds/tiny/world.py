"""The tiny world as a provider (:class:`bench.world.World`): the shipped ``tiny-sd`` / ``tiny-sd-rt`` pipelines, the
procedural coloured-shapes domain (:mod:`worlds.tiny.shapes`) as prompt sets and datasets, its held-out images as
a FID reference, the tiny CLIP as its CLIP scorer, and the store of pre-embedded defences (``bench zoo embed``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from markbench.errors import UserError
from markbench.world import World, worlds

import markbench.worlds.tiny as _pkg  # attributes read at call time (tests point them elsewhere)


def _domain_captions(n: int, split: int) -> tuple[str, ...]:
    """``n`` fixed captions of the training (0) or held-out (1) combinations, spread over every shape."""
    from . import shapes

    combos = shapes.combinations()[split]
    stride = 1 if split == 1 else 5  # the training combinations are many: spread the picks over all shapes
    sizes = list(shapes.SIZES)
    return tuple(shapes.Item(*combos[(i * stride) % len(combos)], sizes[(i // 2) % len(sizes)]).caption
                 for i in range(n))


@worlds.register("tiny")
class TinyWorld(World):
    """The shipped tiny world: coloured shapes at 64 px (``docs/tiny_world.md``).

    Prompt sets: ``tiny:heldout`` (64 fixed held-out captions: combinations of shape, colour and background the
    shipped tiny-sd never saw whole; every word it did see), ``tiny:train`` (128 captions of the training
    combinations, for defences that train on the model's own images, so the evaluation prompts stay unseen by the
    watermark too). Datasets (generated deterministically from a seed, nothing on disk): ``tiny:train``,
    ``tiny:heldout``, ``tiny:style`` (the downstream new style), ``tiny:subject`` (the downstream new subject).
    """

    version = "1"
    params = ()

    description = "shipped tiny-sd / tiny-sd-rt pipelines (and the attacker's tiny-sd-ind) and the coloured-shapes domain (64 px)"
    legacy_prompt_sets = {"tiny": "heldout", "tiny-train": "train"}
    legacy_references = {"tiny_world_heldout": "heldout"}
    clip_models = ("tiny-world",)

    def models(self) -> Mapping[str, str]:
        # tiny-sd-ind: the attacker's independent pipeline (regen_diffusion / rinse's model); a complete SD pipeline,
        # so it loads as a base model too
        return {"tiny-sd": "shipped", "tiny-sd-rt": "shipped", "tiny-sd-ind": "shipped"}

    def model_folder(self, name: str) -> Path:
        from markbench.models import variant_folder

        if not (_pkg.TINY_SD / "model_index.json").exists():
            raise UserError(f"model.builtin = {name!r}: the shipped tiny-world pipeline is missing from "
                            f"{_pkg.TINY_SD}; rebuild it with 'bench zoo build' or use model.builtin = 'micro-sd'")
        if name == "tiny-sd":
            return _pkg.TINY_SD
        if name == "tiny-sd-ind":
            return self._independent_folder()
        if not (_pkg.TINY_SD_RT / "vae" / "config.json").exists():
            raise UserError(f"model.builtin = 'tiny-sd-rt': its VAE is missing from {_pkg.TINY_SD_RT}; rebuild it "
                            f"with 'bench zoo build --only vae' or use model.builtin = 'tiny-sd'")
        return variant_folder(_pkg.TINY_SD, {"vae": _pkg.TINY_SD_RT / "vae"},
                              f"tiny-sd-rt-{_pkg.fingerprint('tiny-sd')}-{_pkg.fingerprint('tiny-sd-rt')}")

    def _independent_folder(self) -> Path:
        """tiny-sd-ind: tiny-sd's folder with the attacker's VAE (tiny-vae-ind) and UNet linked in; its text encoder,
        tokenizer and scheduler are tiny-sd's (the text encoder is the public tiny CLIP's text tower)."""
        from markbench.models import variant_folder

        for folder, stage in ((_pkg.TINY_VAE_IND / "vae", "vae-ind"), (_pkg.TINY_SD_IND / "unet", "unet-ind")):
            if not (folder / "config.json").exists():
                raise UserError(f"model 'tiny-sd-ind': the attacker's {folder.name} is missing from {folder.parent}; "
                                f"build it with 'bench zoo build --only {stage}'")
        ids = "-".join(_pkg.fingerprint(m) for m in ("tiny-sd", "tiny-vae-ind", "tiny-sd-ind"))
        return variant_folder(_pkg.TINY_SD, {"vae": _pkg.TINY_VAE_IND / "vae", "unet": _pkg.TINY_SD_IND / "unet"},
                              f"tiny-sd-ind-{ids}")

    def model_identity(self, name: str) -> tuple[str, ...]:
        # tiny-sd-rt is tiny-sd with another VAE decoder: both checksums identify it; tiny-sd-ind is tiny-sd's text
        # encoder with the attacker's VAE and UNet
        if name == "tiny-sd-ind":
            return tuple(_pkg.fingerprint(m) for m in ("tiny-sd", "tiny-vae-ind", "tiny-sd-ind"))
        return (_pkg.fingerprint(),) + ((_pkg.fingerprint("tiny-sd-rt"),) if name == "tiny-sd-rt" else ())

    def autoencoders(self) -> Mapping[str, str]:
        return {"tiny-vae-ind": "tiny-sd's VAE architecture and latent shape, trained from another seed on images "
                                "tiny-sd's VAE never saw, about a quarter of its training (bench zoo build --only "
                                "vae-ind); its own latent space, not tiny-sd's"}

    def autoencoder_identity(self, name: str) -> tuple[str, ...]:
        return (_pkg.fingerprint(name),)  # its rows of the manifest's file table: a rebuild changes them

    def autoencoder_folder(self, name: str) -> Path:
        if name != "tiny-vae-ind":
            return super().autoencoder_folder(name)
        folder = _pkg.TINY_VAE_IND / "vae"
        if not (folder / "config.json").exists():
            raise UserError(f"the tiny world's independent attacker VAE is missing from {_pkg.TINY_VAE_IND}; build it "
                            f"with 'bench zoo build --only vae-ind'")
        return folder

    def prompt_sets(self) -> Mapping[str, Callable[[], Sequence[str]]]:
        return {"heldout": lambda: _domain_captions(64, 1), "train": lambda: _domain_captions(128, 0)}

    def datasets(self) -> Sequence[str]:
        from . import shapes

        return tuple(shapes.SPLITS)

    def load_dataset(self, name: str, n: int, seed: int = 0):
        import torch

        from . import shapes

        arr, captions, _ = shapes.make_dataset(name, n, seed=seed)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255), list(captions)

    def downstream_task(self, name: str, token: str | None = None):
        from .downstream import task_for

        return task_for(name, token)

    def same_content(self, images, reference):
        from .downstream import Recogniser

        return Recogniser.shared().same_content(images, reference)

    def clip_scorer(self, model: str, pretrained: str | None, device: str, batch_size: int) -> Any:
        from .clip_model import scorer

        return scorer(pretrained, device, batch_size, default=_pkg.TINY_CLIP)

    def clip_identity(self, model: str) -> tuple[str, ...]:
        return (_pkg.fingerprint("tiny-clip"),)

    def register_open_clip(self) -> None:
        from .clip_model import register

        register()  # TinyWorld-RN is an open_clip architecture too

    def prebuilt_stores(self) -> tuple[Path, ...]:
        return (_pkg.PREBUILT,)

    def cli_module(self) -> str | None:
        return "markbench.worlds.tiny.cli"

    @property
    def artifacts(self) -> Path:
        return _pkg.ARTIFACTS
