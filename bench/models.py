"""Loading pipelines the same way for every world, and storing model changes as weight overrides.

* ``builtin``: a model that a world provides (:mod:`bench.world`: ``tiny-sd`` from the tiny world's shipped folder,
  ``micro-sd`` built from configs under a fixed seed and written once with ``save_pretrained``), loaded from its
  folder by :func:`load_pipeline_folder`, the very function a real Stable Diffusion folder goes through.
* ``path``: any local diffusers pipeline folder.
* ``hub_id``: a Hugging Face hub id (needs network access and, for gated models, a token).

A modified model (a watermark embedded, an attack applied) is stored as the tensors that differ from the base
(:func:`diff_pipeline`) and rebuilt by :func:`apply_overrides`.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

COMPONENTS = ("unet", "vae", "text_encoder")


def markbench_home() -> Path:
    """Where built artifacts live: ``$MARKBENCH_HOME`` or ``~/.cache/markbench``."""
    return Path(os.environ.get("MARKBENCH_HOME", Path.home() / ".cache" / "markbench"))


# ---------------------------------------------------------------------------------------------------------------
# The real CLIP BPE tokenizer, built offline from the vocabulary open-clip-torch ships
# ---------------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_tokenizer(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of CLIP's BPE (49,408 tokens) from open-clip-torch's vocabulary."""
    import open_clip

    src = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(src, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


def clip_tokenizer(folder: Path | None = None):
    from transformers import CLIPTokenizer

    folder = folder or markbench_home() / "tokenizers" / "clip-bpe-49408"
    if not (folder / "merges.txt").exists():
        write_clip_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------------------------
# Built-in models: folders that worlds provide
# ---------------------------------------------------------------------------------------------------------------
def variant_folder(base: Path, replace: dict[str, Path], name: str) -> Path:
    """A pipeline folder (under ``$MARKBENCH_HOME/models/name``) that is ``base`` with some components replaced:
    symbolic links to the shipped files, made once, so a variant costs no copy and loads like any folder."""
    folder = markbench_home() / "models" / name
    targets = {e.name: Path(replace.get(e.name, e)).resolve() for e in sorted(Path(base).iterdir())}
    if folder.is_dir() and {e.name: e.resolve() for e in folder.iterdir()} == targets:
        return folder
    if folder.is_dir():  # made by another checkout of the package (same files, other place): point it here
        shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for entry, target in targets.items():
        (tmp / entry).symlink_to(target)
    try:
        tmp.replace(folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def builtin_folder(name: str) -> Path:
    """The pipeline folder of the built-in model ``name`` (built or linked once by the world that provides it)."""
    from .world import world_of_model

    return world_of_model(name).model_folder(name)


def builtin_models() -> dict[str, str]:
    """Every built-in model name -> the world that provides it."""
    from .world import model_names

    return model_names()


# ---------------------------------------------------------------------------------------------------------------
# Attacker models: what an attack regenerates or optimises through instead of the run's base model
# ---------------------------------------------------------------------------------------------------------------
#: the attacker-model value that means "the run's clean base model" (what an attacker of released weights has)
BASE = "base"


def vae_source(source: str, where: str = "vae") -> tuple[str, Path | None]:
    """What an attacker-VAE value names, checked without loading anything: ``("base", None)``, or the kind
    (``"autoencoder"``: a standalone VAE a world ships, e.g. the tiny world's independent ``tiny-vae-ind``;
    ``"model"``: a built-in model's VAE, e.g. ``tiny-sd-rt``; ``"folder"``: a diffusers VAE folder, or a pipeline
    folder with a ``vae/`` subfolder) and its folder (``None`` for a built-in model: built on first use).
    :class:`~bench.errors.ConfigError` in one sentence if it is none of these."""
    from .errors import ConfigError
    from .world import autoencoder_folder, autoencoder_names, model_names

    if source == BASE:
        return BASE, None
    if source in autoencoder_names():
        return "autoencoder", autoencoder_folder(source)
    if source in model_names():
        return "model", None
    folder = Path(source).expanduser()
    if (folder / "config.json").is_file():
        return "folder", folder
    if (folder / "vae" / "config.json").is_file():
        return "folder", folder / "vae"
    known = sorted(autoencoder_names()) + sorted(model_names())
    raise ConfigError(f"{where} = {source!r} is neither 'base', a shipped autoencoder or built-in model "
                      f"({', '.join(known)}) nor a folder with a VAE (config.json, or vae/config.json)")


def pipeline_source(source: str, where: str = "model") -> tuple[str, Path | None]:
    """What an attacker-pipeline value names: ``("base", None)``, ``("model", None)`` (a built-in model, e.g. the
    tiny world's independent attacker pipeline ``tiny-sd-ind``) or ``("folder", path)`` (a diffusers pipeline
    folder); a :class:`~bench.errors.ConfigError` for anything else, and one that says why for a standalone
    autoencoder (it is no pipeline: a world ships the pipeline built on it, if any, as a built-in model)."""
    from .errors import ConfigError
    from .world import autoencoder_names, model_names

    if source == BASE:
        return BASE, None
    if source in model_names():
        return "model", None
    if source in autoencoder_names():
        raise ConfigError(f"{where} = {source!r} is a standalone autoencoder, not a pipeline (the base UNet denoises "
                          f"another latent space); use it with regen_vae, or name a pipeline: 'base', a built-in "
                          f"model ({', '.join(sorted(model_names()))}; a world's attacker pipeline built on that "
                          f"autoencoder is among them) or a folder")
    folder = Path(source).expanduser()
    if (folder / "model_index.json").is_file():
        return "folder", folder
    raise ConfigError(f"{where} = {source!r} is neither 'base', a built-in model ({', '.join(sorted(model_names()))}) "
                      f"nor a diffusers pipeline folder (model_index.json)")


_ATTACKER_MODELS: dict[tuple[str, str, str, str], Any] = {}


def load_vae(source: str, device: str = "cpu", dtype: str = "float32", where: str = "vae"):
    """The attacker VAE ``source`` names (:func:`vae_source`; not ``"base"``: that one is the run's own pipeline's),
    loaded once per process, in eval mode without gradients on its weights. Shared: read it, never train it."""
    import torch

    kind, folder = vae_source(source, where)
    if kind == BASE:
        raise ValueError("load_vae('base'): the base model's VAE is the run's pipeline's (ctx.model.vae)")
    key = ("vae", str(folder) if folder is not None else source, str(device), dtype)
    if key not in _ATTACKER_MODELS:
        from diffusers import AutoencoderKL

        _quiet_loading()
        if folder is None:
            folder = builtin_folder(source) / "vae"
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                            torch_dtype=getattr(torch, _DTYPES[dtype]))
        _ATTACKER_MODELS[key] = vae.to(device).eval().requires_grad_(False)
    return _ATTACKER_MODELS[key]


def load_attacker_pipeline(source: str, device: str = "cpu", dtype: str = "float32", where: str = "model"):
    """The attacker pipeline ``source`` names (:func:`pipeline_source`; not ``"base"``), loaded once per process.
    Shared: build new pipelines from its components, never change its weights."""
    kind, folder = pipeline_source(source, where)
    if kind == BASE:
        raise ValueError("load_attacker_pipeline('base'): the base pipeline is the run's (ctx.model)")
    key = ("pipeline", str(folder) if folder is not None else source, str(device), dtype)
    if key not in _ATTACKER_MODELS:
        _ATTACKER_MODELS[key] = load_pipeline_folder(folder if folder is not None else builtin_folder(source), dtype,
                                                     device)
    return _ATTACKER_MODELS[key]


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_pipeline_folder(folder: str | os.PathLike, dtype: str = "float32", device: str = "cpu",
                         use_safetensors: bool | None = True):
    """Load a diffusers Stable Diffusion pipeline folder, offline. Real SD folders and built-ins go through here.
    Only safetensors weights are read unless ``use_safetensors=None`` (``model.allow_pickle``; bench.modelcheck)."""
    import torch
    from diffusers import DiffusionPipeline

    _quiet_loading()
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                             dtype=getattr(torch, _DTYPES[dtype]), use_safetensors=use_safetensors,
                                             safety_checker=None, requires_safety_checker=False)
    return _prepare(pipe, device)


def load_pipeline(model_cfg, device: str = "cpu"):
    """Load the pipeline a :class:`~bench.config.ModelConfig` names."""
    safe_only = None if getattr(model_cfg, "allow_pickle", False) else True
    if model_cfg.builtin:
        return load_pipeline_folder(builtin_folder(model_cfg.builtin), model_cfg.dtype, device)
    if model_cfg.path:
        return load_pipeline_folder(model_cfg.path, model_cfg.dtype, device, use_safetensors=safe_only)
    import torch
    from diffusers import DiffusionPipeline

    _quiet_loading()
    pipe = DiffusionPipeline.from_pretrained(model_cfg.hub_id, revision=model_cfg.revision,
                                             dtype=getattr(torch, _DTYPES[model_cfg.dtype]), use_safetensors=safe_only,
                                             safety_checker=None, requires_safety_checker=False)
    return _prepare(pipe, device)


def _quiet_loading() -> None:
    """No per-component loading bars from diffusers/transformers: the harness shows its own progress."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _prepare(pipe, device: str):
    pipe.set_progress_bar_config(disable=True)
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe.to(device)


def model_fingerprint(model_cfg) -> str:
    """A cheap identity of the base model for cache keys.

    Built-ins: name, builder version and what the providing world says identifies the weights. Folders: file names, sizes and modification times (not contents, to keep
    an 8 GB folder cheap to fingerprint). Hub ids: id and revision.
    """
    h = hashlib.sha256()
    h.update(model_cfg.dtype.encode())
    if model_cfg.builtin:
        for part in _builtin_identity(model_cfg.builtin):
            h.update(part.encode())
    elif model_cfg.path:
        for part in folder_identity(Path(model_cfg.path)):
            h.update(part.encode())
    else:
        h.update(f"hub:{model_cfg.hub_id}@{model_cfg.revision}".encode())
    return h.hexdigest()


def _builtin_identity(name: str) -> list[str]:
    """A built-in model's name, builder version and what its world says identifies the weights (checksums)."""
    from .world import world_of_model

    world = world_of_model(name)
    return [f"builtin:{name}:v{world.models()[name]}", *world.model_identity(name)]


def folder_identity(root: Path) -> list[str]:
    """A folder's file names, sizes and modification times (not contents: an 8 GB folder stays cheap), following
    linked subfolders (a variant pipeline folder links its components in). A file rewritten with its old size and
    time is not noticed: give changed weights a new file or a new time."""
    out = []
    for folder, _, files in sorted(os.walk(root, followlinks=True)):
        for name in sorted(files):
            f = Path(folder) / name
            if f.is_file():
                st = f.stat()
                out.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return out


def named_model_identity(kind: str, source: str, where: str = "") -> str:
    """A cheap fingerprint of the weights a plugin parameter names (:attr:`bench.params.Param.names_model`), for the
    stage's cache key: a rebuilt shipped model, or a changed folder, gives another key, so cached attacks through
    the old weights are never read for the new ones. ``kind``: ``"vae"`` (:func:`vae_source`), ``"pipeline"``
    (:func:`pipeline_source`), ``"clip"`` (a CLIP scorer: a world's, identified by its world; a ``local-dir:``
    folder by its files; else by its name) or ``"file"`` (a weights file). A shipped model is identified by its
    world's checksums (the manifest: ``bench zoo info --check`` verifies the files against it), a folder or file by
    its files' names, sizes and modification times. ``""`` for ``"base"`` or ``""`` (the run's base model, keyed by
    its own fingerprint; no model). ``where`` names the parameter in an error."""
    from .world import autoencoder_world, world_for_clip_model

    if source in (BASE, ""):
        return ""
    if kind == "file":
        f = Path(source).expanduser()
        st = f.stat()
        parts = [f"file:{f.name}:{st.st_size}:{st.st_mtime_ns}"]
    elif kind == "clip":
        world = world_for_clip_model(source)
        local = Path(source[len("local-dir:"):]) if source.startswith("local-dir:") else None
        parts = [f"clip:{source}", *(world.clip_identity(source) if world is not None else ()),
                 *(folder_identity(local) if local is not None and local.is_dir() else ())]
    else:
        what, folder = (vae_source if kind == "vae" else pipeline_source)(source, where or kind)
        if what == "autoencoder":
            parts = [f"autoencoder:{source}", *autoencoder_world(source).autoencoder_identity(source)]
        elif what == "model":
            parts = _builtin_identity(source)
        else:
            parts = [f"folder:{kind}", *folder_identity(folder)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Overrides: a modified model is the base plus the tensors that changed
# ---------------------------------------------------------------------------------------------------------------
def diff_pipeline(base, new) -> dict[str, Any]:
    """The tensors of ``new`` that differ from ``base``, keyed ``"<component>.<state-dict key>"``."""
    import torch

    out: dict[str, Any] = {}
    for comp in COMPONENTS:
        b, n = getattr(base, comp, None), getattr(new, comp, None)
        if n is None or b is n:
            continue
        bs = b.state_dict()
        for key, tensor in n.state_dict().items():
            ref = bs.get(key)
            if ref is None or ref.shape != tensor.shape or ref.dtype != tensor.dtype or not torch.equal(ref, tensor):
                out[f"{comp}.{key}"] = tensor.detach().to("cpu").contiguous()
    return out


def apply_overrides(base, overrides: dict[str, Any]):
    """A pipeline equal to ``base`` with ``overrides`` loaded; untouched components are shared, not copied."""
    if not overrides:
        return base
    by_comp: dict[str, dict[str, Any]] = {}
    for key, tensor in overrides.items():
        comp, _, sub = key.partition(".")
        by_comp.setdefault(comp, {})[sub] = tensor
    components = dict(base.components)
    for comp, tensors in by_comp.items():
        module = copy.deepcopy(getattr(base, comp))
        state = module.state_dict()
        unknown = [k for k in tensors if k not in state]
        if unknown:
            raise KeyError(f"override keys not in {comp}: {unknown[:3]}")
        for k, t in tensors.items():
            if state[k].shape != t.shape:
                raise ValueError(f"override {comp}.{k} has shape {tuple(t.shape)}, expected {tuple(state[k].shape)}")
        module.load_state_dict(tensors, strict=False)
        components[comp] = module
    return rebuild_pipeline(base, components)


def rebuild_pipeline(like, components: dict[str, Any]):
    """A pipeline of ``like``'s class from ``components`` (quietly: no safety-checker notice for every copy)."""
    import inspect

    kwargs = dict(components)
    if "requires_safety_checker" in inspect.signature(type(like).__init__).parameters:
        kwargs["requires_safety_checker"] = bool(getattr(like.config, "requires_safety_checker", False))
    pipe = type(like)(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
