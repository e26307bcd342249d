"""Loading pipelines the same way for every world, and storing model changes as weight overrides.

* ``builtin:<name>``: a small Stable-Diffusion-architecture pipeline built from configs under a fixed seed, written
  once to a folder with ``save_pretrained`` and then loaded from that folder by :func:`load_pipeline_folder`, the
  very function a real Stable Diffusion folder goes through.
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

#: builtin name -> version. ``micro-sd`` is built from configs (bump the version when its builder changes);
#: ``tiny-sd`` is the trained tiny-world pipeline shipped in ``bench/zoo/artifacts`` (identified by its checksums);
#: ``tiny-sd-rt`` is ``tiny-sd`` with the round-trip VAE decoder (same UNet, text encoder and VAE encoder; see
#: :mod:`bench.zoo.train_vae`, stage 3): only its ``vae/`` is shipped, the rest is tiny-sd's.
BUILTIN_MODELS: dict[str, str] = {"tiny-sd": "shipped", "tiny-sd-rt": "shipped", "micro-sd": "1"}


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
# Built-in micro pipeline (random weights, Stable Diffusion's architecture and component names)
# ---------------------------------------------------------------------------------------------------------------
def build_micro_sd(seed: int = 0, sample_size: int = 64):
    """A Stable-Diffusion-architecture pipeline at micro width, randomly initialised under ``seed``.

    Same component names and module layout as SD 1.x (down/up blocks with cross-attention transformers), so code
    written for Stable Diffusion applies unchanged. Its images are noise-like: it proves plumbing, not quality.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)  # builder only: the artifact is then fixed on disk
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=16, sample_size=sample_size,
    )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=sample_size // factor, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        projection_dim=32,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


_BUILDERS = {"micro-sd": build_micro_sd}


def _variant_folder(base: Path, replace: dict[str, Path], name: str) -> Path:
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
    """Build (once) and return the folder of a built-in pipeline (``tiny-sd``: the shipped folder)."""
    if name in ("tiny-sd", "tiny-sd-rt"):
        from . import zoo
        from .errors import UserError

        if not (zoo.TINY_SD / "model_index.json").exists():
            raise UserError(f"model.builtin = {name!r}: the shipped tiny-world pipeline is missing from "
                            f"{zoo.TINY_SD}; rebuild it with 'bench zoo build' or use model.builtin = 'micro-sd'")
        if name == "tiny-sd":
            return zoo.TINY_SD
        if not (zoo.TINY_SD_RT / "vae" / "config.json").exists():
            raise UserError(f"model.builtin = 'tiny-sd-rt': its VAE is missing from {zoo.TINY_SD_RT}; rebuild it "
                            f"with 'bench zoo build --only vae' or use model.builtin = 'tiny-sd'")
        return _variant_folder(zoo.TINY_SD, {"vae": zoo.TINY_SD_RT / "vae"},
                               f"tiny-sd-rt-{zoo.fingerprint('tiny-sd')}-{zoo.fingerprint('tiny-sd-rt')}")
    folder = markbench_home() / "models" / f"{name}-v{BUILTIN_MODELS[name]}"
    if not (folder / "model_index.json").exists():
        pipe = _BUILDERS[name]()
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        pipe.save_pretrained(tmp)
        tmp.replace(folder) if not folder.exists() else None
    return folder


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

    Built-ins: name and builder version. Folders: file names, sizes and modification times (not contents, to keep
    an 8 GB folder cheap to fingerprint). Hub ids: id and revision.
    """
    h = hashlib.sha256()
    h.update(model_cfg.dtype.encode())
    if model_cfg.builtin:
        h.update(f"builtin:{model_cfg.builtin}:v{BUILTIN_MODELS[model_cfg.builtin]}".encode())
        if model_cfg.builtin in ("tiny-sd", "tiny-sd-rt"):
            from . import zoo

            h.update(zoo.fingerprint().encode())
            if model_cfg.builtin == "tiny-sd-rt":
                h.update(zoo.fingerprint("tiny-sd-rt").encode())
    elif model_cfg.path:
        root = Path(model_cfg.path)
        for f in sorted(root.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(f"hub:{model_cfg.hub_id}@{model_cfg.revision}".encode())
    return h.hexdigest()


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
