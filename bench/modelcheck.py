"""Checks of the user's model before any work: is it there, is it a diffusers pipeline, can it be loaded without
running code (docs/reliability.md).

* A folder (``model.path``, or a hub snapshot in the local Hugging Face cache) must have a ``model_index.json`` that
  is a JSON object, and each of its weight-bearing components (a sub-folder with a ``config.json``) must hold
  ``.safetensors`` weights. Pickle weights (``.bin``, ``.ckpt``, ``.pt``, ``.pth``, ``.pkl``) can execute code when
  loaded: a component with only those is refused unless ``model.allow_pickle = true`` (``--allow-pickle``), and the
  loader is told to read safetensors only (:func:`load_base`), so a pickle file beside safetensors is never read.
* A hub id must be in the local cache, or the hub must be reachable (checked once, a few seconds at most).
* :func:`load_base` loads the base pipeline once for the run; a failure is the user's input, not a plugin's: one
  sentence (:class:`~bench.errors.UserError`, exit 2) instead of every cell failing in its embed stage.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from .errors import BenchError, ConfigError, UserError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
OPT_IN = "model.allow_pickle = true (or --allow-pickle)"
#: the JSON files of a component that diffusers / transformers read when loading it
LOADER_JSON = frozenset({"config.json", "scheduler_config.json", "tokenizer_config.json", "tokenizer.json",
                         "special_tokens_map.json", "added_tokens.json", "vocab.json", "preprocessor_config.json",
                         "generation_config.json"})
#: configuration files larger than this are not parsed by the check (a tokenizer.json is a few MB)
MAX_JSON_BYTES = 64 * 2 ** 20


def _cut(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def check_pipeline_folder(folder: Path, where: str, allow_pickle: bool = False) -> None:
    """Refuse a folder that is not a loadable diffusers pipeline, or that holds only pickle weights."""
    index = folder / "model_index.json"
    try:
        data = json.loads(index.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{where}: {folder} is not a diffusers pipeline folder (no model_index.json)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {index} is not valid JSON ({_cut(exc, 80)}); it must be the model_index.json "
                          "that save_pretrained writes") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {index} must hold a JSON object naming the pipeline's components")
    if not isinstance(data.get("_class_name"), str):
        raise ConfigError(f"{where}: {index} has no '_class_name' (the pipeline's class, e.g. "
                          "\"StableDiffusionPipeline\"); it must be the model_index.json that save_pretrained writes")
    for name, value in data.items():
        if name.startswith("_") or (not isinstance(value, list) and not (folder / name).is_dir()):
            continue  # a pipeline setting such as "requires_safety_checker": false
        if not (isinstance(value, list) and len(value) == 2
                and all(v is None or isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: {index}: '{_cut(name, 60)}' = {_cut(json.dumps(value), 60)} is invalid: "
                              "a component must be [library, class], e.g. [\"diffusers\", \"AutoencoderKL\"], or "
                              "[null, null]")
        if not (value[0] and value[1]):
            continue
        unknown = _unknown_class(value[0], value[1])
        if unknown:
            raise ConfigError(f"{where}: {index}: '{_cut(name, 60)}' = {_cut(json.dumps(value), 80)} {unknown}; it must "
                              "name a class of that library, as save_pretrained writes it")
        comp = folder / name
        if not comp.is_dir():
            raise ConfigError(f"{where}: {index} names the component '{_cut(name, 60)}' but {comp} is missing")
        files = [f for f in comp.iterdir() if f.is_file()]
        for f in files:  # the files the loaders read (others, e.g. a user's notes, are not looked at)
            if (f.name in LOADER_JSON or f.name.endswith(".index.json")) and f.stat().st_size <= MAX_JSON_BYTES:
                try:
                    data, why = json.loads(f.read_bytes()), "it is not a JSON object"
                except OSError as exc:
                    data, why = None, f"it cannot be read ({exc.strerror or type(exc).__name__})"
                except ValueError as exc:
                    data, why = None, f"it is not valid JSON ({_cut(exc, 60)})"
                if not isinstance(data, dict):
                    raise ConfigError(f"{where}: {f} cannot be loaded: {why}; it must be the file save_pretrained "
                                      "writes (reinstall or re-save the model)")
        weights = [f for f in files if f.name.endswith(".safetensors") or f.suffix in PICKLE_SUFFIXES]
        if weights and not (comp / "config.json").exists():
            raise ConfigError(f"{where}: {comp} has weights but no config.json; the loader needs both (re-save the "
                              "model with save_pretrained)")
        if not (comp / "config.json").exists():
            continue  # scheduler, tokenizer, feature extractor: configuration files only
        for f in files:
            if f.name.endswith(".safetensors"):
                problem = safetensors_problem(f)
                if problem:
                    raise ConfigError(f"{where}: {f} is not a complete safetensors file ({problem}); re-download or "
                                      "re-save the model")
        if any(f.name.endswith(".safetensors") for f in files):
            continue
        pickles = sorted(f for f in files if f.suffix in PICKLE_SUFFIXES)
        if pickles and not allow_pickle:
            raise ConfigError(f"{where}: {pickles[0]} holds pickle weights, which can run code when loaded, and "
                              f"'{name}' has no .safetensors; convert it to safetensors or, if you trust the file, "
                              f"set {OPT_IN}")
        if not pickles:
            raise ConfigError(f"{where}: {comp} has no weights (no .safetensors file)")


def _unknown_class(library: str, name: str) -> str:
    """Why ``[library, name]`` names no loadable class ("" when it does, or when the library is not one whose names
    can be listed without loading: a custom pipeline's own library is left to the loader)."""
    if library not in ("diffusers", "transformers"):
        return ""
    import importlib
    import sys

    module = sys.modules.get(library) or importlib.import_module(library)
    names = getattr(module, "_class_to_module", None)  # the lazy module's table: no class is imported
    if not isinstance(names, dict) or name in names or name in getattr(module, "__all__", ()):
        return ""
    return f"names no class of {library}"


def safetensors_problem(path: Path) -> str:
    """What is wrong with a safetensors file's framing, read from its header only (no tensor is loaded): ``""`` when
    the header parses and the file is exactly as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than the 8-byte header length"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 * 2 ** 20):
                return f"the header claims {n} bytes, the file has {size}"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"unreadable header: {_cut(exc, 60)}"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        return "a tensor entry without data offsets"
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"{size} bytes where the header describes {expected}"
    return ""


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_model(cfg) -> None:
    """Everything about the model that can be checked before it loads (run by ``bench validate`` and ``bench run``,
    once). Local folders are already checked with the config; this adds shipped built-ins and the hub id."""
    model = cfg.model
    if model.builtin:
        from .world import world_of_model

        # the world says what it can check without building anything: a shipped or downloaded model that is missing
        # is one sentence naming how to provide it
        folder = world_of_model(model.builtin).check_model(model.builtin)
        if folder is not None:
            check_pipeline_folder(folder, f"{cfg.path}: model.builtin = {model.builtin!r}", model.allow_pickle)
    if not model.hub_id:
        return
    where = f"{cfg.path}: model.hub_id = {_cut(model.hub_id, 80)!r}"
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(model.hub_id, revision=model.revision, local_files_only=True))
    except Exception:
        snapshot = None
    if snapshot is not None:
        check_pipeline_folder(snapshot, where, model.allow_pickle)
        return
    if not _hub_reachable():
        raise ConfigError(f"{where}: not in the local Hugging Face cache and the hub cannot be reached; download it "
                          f"where the hub is reachable (huggingface-cli download {_cut(model.hub_id, 80)}) and copy "
                          f"the cache here, or set model.path to a local diffusers folder")


def load_base(cfg):
    """The run's base pipeline; a model that cannot be loaded is one user error, not a failure of every cell."""
    from .models import load_pipeline

    try:
        return load_pipeline(cfg.model, device=cfg.run.device)
    except BenchError:
        raise
    except Exception as exc:
        m = cfg.model
        what = (f"model.builtin = {m.builtin!r}" if m.builtin else f"model.path = {_cut(m.path, 80)!r}" if m.path
                else f"model.hub_id = {_cut(m.hub_id, 80)!r}")
        raise UserError(f"{cfg.path}: {what} could not be loaded ({type(exc).__name__}: {_cut(exc)}); point "
                        "model.path at a diffusers pipeline folder written by save_pretrained") from exc
