"""Worlds: where base models, prompt sets, datasets, quality references and shipped embeddings come from.

The core knows no world by name. A *world* is a provider registered in :data:`worlds` (built-ins by
``"module:attr"``; third-party worlds through the entry-point group ``bench.worlds``). It provides

* **models**: the names it answers to in ``model.builtin`` (``tiny-sd``, ``micro-sd`` ...), each a diffusers pipeline
  folder plus the strings that identify its weights in cache keys (:meth:`World.model_folder`,
  :meth:`World.model_identity`);
* **named prompt sets and datasets**, in ONE spec syntax, ``"<world>:<name>"``: ``"tiny:heldout"`` is a prompt set
  (its captions) where prompts are asked for, and an image-caption dataset where training data is asked for
  (:func:`load_prompt_set`, :func:`load_dataset`);
* **quality references**: named real-image sets for FID (``reference = "tiny:heldout"``) and the CLIP scorer it
  recommends for ``clip_score`` (``model = "tiny-world"`` today: a world names its scorer);
* **a read-only store of pre-embedded defences** (:meth:`World.prebuilt_stores`) that the artifact cache reads behind
  its own, and optionally a command group for the ``bench`` CLI (``bench zoo`` is the tiny world's).

A world is one file: subclass :class:`World` and decorate it with ``@worlds.register("name")``: in the ``worlds``
package that is all (the decorator is found by a static scan); a third-party package also exposes the class in the
``bench.worlds`` entry-point group.

Legacy spellings (``builtin:<set>`` for prompt sets, ``[prompts] builtin = "<set>"``) are still read: a world declares
them in :attr:`World.legacy_prompt_sets`. They stay because a plugin parameter is part of its cache key, and the
tiny world ships a SleeperMark embedding whose key spells its training prompts ``builtin:tiny-train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

from .discovery import builtin_plugins
from .errors import UserError
from .registry import Registry, suggest

if TYPE_CHECKING:  # pragma: no cover
    import torch


class World:
    """One provider of base models, prompt sets, datasets, quality references and shipped embeddings.

    Every method has a neutral default, so a world that only provides models (a folder of Stable Diffusion weights)
    is a few lines. Methods must import heavy libraries lazily: ``bench ls`` lists worlds without torch.
    """

    version: ClassVar[str] = "1"
    name: ClassVar[str] = ""
    params: ClassVar[tuple] = ()
    description: ClassVar[str] = ""
    #: old prompt-set names this world answers to in ``builtin:<name>`` specs: legacy name -> prompt-set name
    legacy_prompt_sets: ClassVar[Mapping[str, str]] = {}
    #: old FID reference names: legacy name -> dataset name
    legacy_references: ClassVar[Mapping[str, str]] = {}
    #: the ``clip_score`` model names this world's scorer answers to (see :meth:`clip_scorer`)
    clip_models: ClassVar[tuple[str, ...]] = ()

    # -- models -------------------------------------------------------------------------------------------------
    def models(self) -> Mapping[str, str]:
        """``model.builtin`` name -> builder version (part of every cache key)."""
        return {}

    def model_folder(self, name: str) -> Path:
        """A diffusers pipeline folder for ``name`` (built or linked on first use); :class:`UserError` if missing."""
        raise UserError(f"world '{self.name}' has no model {name!r}")

    def check_model(self, name: str) -> Path | None:
        """Before any model loads (``bench validate``, ``bench run``): the model's folder if it can be found without
        building anything, ``None`` if it is built on first use; a :class:`UserError` saying how to provide it if it
        is missing. Default: :meth:`model_folder`."""
        return self.model_folder(name)

    def model_identity(self, name: str) -> tuple[str, ...]:
        """Extra strings hashed into the model's fingerprint (e.g. checksums of shipped weights)."""
        return ()

    # -- attacker models ----------------------------------------------------------------------------------------
    def autoencoders(self) -> Mapping[str, str]:
        """Standalone autoencoders this world ships for attackers, by name -> a one-line description: VAEs with the
        latent shape of its models, trained independently of them (another seed, other images), so that "an
        attack through a model the defender never saw" can be measured (``regen_vae``'s ``vae``,
        ``adv_embedding``'s ``encoder``, ``vae_swap``'s ``source``)."""
        return {}

    def autoencoder_folder(self, name: str) -> Path:
        """A diffusers ``AutoencoderKL`` folder (``config.json`` + weights) for the autoencoder ``name``."""
        raise UserError(f"world '{self.name}' has no autoencoder {name!r}")

    def autoencoder_identity(self, name: str) -> tuple[str, ...]:
        """Strings that identify the autoencoder ``name``'s weights, for cache keys (e.g. checksums of shipped files).
        Default: its folder's file names, sizes and modification times (:func:`bench.models.folder_identity`)."""
        from .models import folder_identity

        return tuple(folder_identity(self.autoencoder_folder(name)))

    # -- prompts and data ---------------------------------------------------------------------------------------
    def prompt_sets(self) -> Mapping[str, Callable[[], Sequence[str]]]:
        """Named prompt sets: name -> a function returning the prompts (built on first use)."""
        return {}

    def datasets(self) -> Sequence[str]:
        """Names of the image-caption datasets this world generates or ships."""
        return ()

    def load_dataset(self, name: str, n: int, seed: int = 0) -> tuple["torch.Tensor", list[str]]:
        """``n`` images (float ``[N, 3, H, W]`` in [0, 1], at the world's native size) and their captions."""
        raise UserError(f"world '{self.name}' has no dataset {name!r}")

    def downstream_task(self, name: str, token: str | None = None) -> Any:
        """A :class:`bench.downstream.DownstreamTask` if this world can tell whether a model learnt the dataset
        ``name`` (its held-out captions and a judge of images), else ``None`` (attacker utility then measures only
        the quality kept)."""
        return None

    def same_content(self, images: "torch.Tensor", reference: "torch.Tensor") -> Any:
        """Per image, whether this world's judge reads the same content in ``images`` as in ``reference`` (bool
        ``[N]``; the tiny world: its zero-shot CLIP names the same shape and colour), or ``None`` if the world has no
        such judge (an attack's joint success then rests on the quality bound alone)."""
        return None

    # -- quality references -------------------------------------------------------------------------------------
    def clip_scorer(self, model: str, pretrained: str | None, device: str, batch_size: int) -> Any:
        """The CLIP scorer this world recommends (for ``clip_score``'s ``model`` in :attr:`clip_models`)."""
        raise UserError(f"world '{self.name}' has no CLIP scorer")

    def clip_identity(self, model: str) -> tuple[str, ...]:
        """Strings that identify the weights of this world's CLIP scorer ``model`` (in :attr:`clip_models`), for cache
        keys (e.g. the checksum of its shipped file)."""
        return ()

    def register_open_clip(self) -> None:
        """Make this world's own open_clip architectures known to open_clip (called before creating one)."""

    # -- shipped artifacts and CLI ------------------------------------------------------------------------------
    def prebuilt_stores(self) -> tuple[Path, ...]:
        """Read-only artifact stores of pre-embedded defences that the cache reads behind its own."""
        return ()

    def cli_module(self) -> str | None:
        """A module with ``add_parsers(sub, cfg_args) -> {command: handler}`` adding commands to ``bench``."""
        return None

    # -- derived ------------------------------------------------------------------------------------------------
    def prompts(self, name: str) -> list[str]:
        """A prompt set by name; a dataset's name gives its captions (the 64 first)."""
        sets = self.prompt_sets()
        if name in sets:
            return list(sets[name]())
        if name in self.datasets():
            return self.load_dataset(name, 64)[1]
        choices = sorted(set(sets) | set(self.datasets()))
        raise UserError(f"prompt set '{self.name}:{name}' is unknown{suggest(name, choices)}; "
                        f"available: {', '.join(f'{self.name}:{c}' for c in choices) or 'none'}")


#: Built-in worlds are the classes decorated ``@worlds.register("name")`` in the top-level ``worlds`` package, found by
#: the same static scan as every built-in plugin (:mod:`bench.discovery`), so the core names none; third-party worlds
#: come from the entry-point group ``bench.worlds``. A world module must import lightly (no torch at module top):
#: listing the worlds imports every one.
worlds: Registry = Registry("world", World, "bench.worlds", builtins=lambda: builtin_plugins("worlds"))

_INSTANCES: dict[str, World] = {}


def get_world(name: str, where: str = "") -> World:
    """The (single) instance of the world registered as ``name``."""
    if name not in _INSTANCES:
        _INSTANCES[name] = worlds.get(name, where)()
    return _INSTANCES[name]


def all_worlds() -> list[World]:
    return [get_world(n) for n in worlds.names()]


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def model_names() -> dict[str, str]:
    """Every ``model.builtin`` name -> the world that provides it."""
    out: dict[str, str] = {}
    for w in all_worlds():
        for m in w.models():
            out.setdefault(m, w.name)
    return out


def world_of_model(name: str, where: str = "model.builtin") -> World:
    names = model_names()
    if name not in names:
        raise UserError(f"{where} = {name!r} is unknown{suggest(name, names)}; available: {', '.join(sorted(names))}")
    return get_world(names[name])


def autoencoder_names() -> dict[str, str]:
    """Every standalone autoencoder a world ships (:meth:`World.autoencoders`) -> the world that provides it."""
    out: dict[str, str] = {}
    for w in all_worlds():
        for m in w.autoencoders():
            out.setdefault(m, w.name)
    return out


def autoencoder_world(name: str) -> World:
    """The world that ships the autoencoder ``name``."""
    names = autoencoder_names()
    if name not in names:
        raise UserError(f"autoencoder {name!r} is unknown{suggest(name, names)}; available: "
                        f"{', '.join(sorted(names)) or 'none'}")
    return get_world(names[name])


def autoencoder_folder(name: str) -> Path:
    """The folder of the shipped autoencoder ``name`` (``config.json`` + weights)."""
    return autoencoder_world(name).autoencoder_folder(name)


# ---------------------------------------------------------------------------------------------------------------
# Specs: "<world>:<name>" (and the legacy "builtin:<set>")
# ---------------------------------------------------------------------------------------------------------------
def split_spec(spec: str) -> tuple[str, str] | None:
    """``"tiny:heldout"`` -> ``("tiny", "heldout")``; a spec whose prefix is no registered world -> ``None``."""
    head, sep, tail = spec.partition(":")
    if not sep or not head or head not in worlds:
        return None
    return head, tail


def _legacy_prompt_set(name: str) -> tuple[World, str]:
    for w in all_worlds():
        if name in w.legacy_prompt_sets:
            return w, w.legacy_prompt_sets[name]
    legacy = sorted(f"builtin:{n}" for w in all_worlds() for n in w.legacy_prompt_sets)
    raise UserError(f"prompt set 'builtin:{name}' is unknown{suggest(name, [s[8:] for s in legacy])}; use "
                    f"'<world>:<set>' ({', '.join(prompt_set_specs())}); legacy names: {', '.join(legacy)}")


def is_prompt_spec(spec: str) -> bool:
    """Whether ``spec`` names a world's prompt set (rather than a file)."""
    return spec.startswith("builtin:") or split_spec(spec) is not None


def load_prompt_set(spec: str) -> list[str]:
    """The prompts of ``"<world>:<set>"`` (or a legacy ``"builtin:<set>"`` / bare legacy name)."""
    if spec.startswith("builtin:"):
        world, name = _legacy_prompt_set(spec[len("builtin:"):])
        return world.prompts(name)
    parts = split_spec(spec)
    if parts is None:
        if ":" not in spec:
            world, name = _legacy_prompt_set(spec)
            return world.prompts(name)
        raise UserError(f"prompt set {spec!r}: '{spec.partition(':')[0]}' is no world; available worlds: "
                        f"{', '.join(worlds.names())}")
    return get_world(parts[0]).prompts(parts[1])


def prompt_set_specs() -> list[str]:
    return sorted(f"{w.name}:{s}" for w in all_worlds() for s in w.prompt_sets())


def dataset_specs() -> list[str]:
    return sorted(f"{w.name}:{d}" for w in all_worlds() for d in w.datasets())


def is_dataset_spec(spec: str) -> bool:
    return split_spec(spec) is not None


def load_dataset(spec: str, n: int, seed: int = 0) -> tuple["torch.Tensor", list[str]]:
    """``n`` images and captions of the dataset ``"<world>:<name>"``."""
    parts = split_spec(spec)
    if parts is None:
        raise UserError(f"dataset {spec!r} is not '<world>:<name>'; available: {', '.join(dataset_specs())}")
    world = get_world(parts[0])
    if parts[1] not in world.datasets():
        raise UserError(f"dataset {spec!r}: world '{world.name}' has no dataset '{parts[1]}'"
                        f"{suggest(parts[1], world.datasets())}; allowed: "
                        + ", ".join(f"{world.name}:{d}" for d in world.datasets()))
    return world.load_dataset(parts[1], n, seed)


def resolve_reference(spec: str) -> str | None:
    """A FID reference name as ``"<world>:<dataset>"`` (legacy names mapped), or ``None`` if it names no world."""
    for w in all_worlds():
        if spec in w.legacy_references:
            return f"{w.name}:{w.legacy_references[spec]}"
    parts = split_spec(spec)
    if parts is not None and parts[1] in get_world(parts[0]).datasets():
        return spec
    return None


def world_for_clip_model(model: str) -> World | None:
    for w in all_worlds():
        if model in w.clip_models:
            return w
    return None


def prebuilt_stores() -> tuple[Path, ...]:
    """Every world's read-only store of pre-embedded defences (existing folders only)."""
    out: list[Path] = []
    for w in all_worlds():
        out.extend(p for p in w.prebuilt_stores() if Path(p).is_dir())
    return tuple(out)
