"""``bench zoo build``: rebuild every tiny-world artifact from a seed, with checkpoints that resume.

Stages (each resumable; ``--only`` runs one):

1. ``clip``: the tiny CLIP (:mod:`worlds.tiny.train_clip`) -> ``artifacts/tiny-clip/``
2. ``vae``: the VAE (:mod:`worlds.tiny.train_vae`); its stage-1 encoder fixes the latent space; its stage 3 (round
   trip) gives ``artifacts/tiny-sd-rt/vae/``, the VAE of the ``tiny-sd-rt`` variant
3. ``unet``: the latent UNet on that latent space, with the CLIP's text tower as text encoder
   (:mod:`worlds.tiny.train_unet`) -> ``artifacts/tiny-sd/`` (a diffusers Stable Diffusion folder)
4. ``vae-ind``: the independent attacker VAE (:func:`worlds.tiny.train_vae.train_attacker_vae`): tiny-sd's VAE
   architecture and latent shape, trained from another seed (:data:`~worlds.tiny.train_vae.ATTACKER_SEED_OFFSET`) on
   images the defender's VAE never saw, on a shorter schedule -> ``artifacts/tiny-vae-ind/vae/`` (float16 weights),
   the attacker model ``tiny-vae-ind`` of ``regen_vae``, ``adv_embedding`` and ``vae_swap``. It depends on no other
   stage; ``--only vae-ind`` adds it to a shipped folder without touching the other artifacts or the manifest's
   other entries.
5. ``unet-ind``: the independent attacker UNet (:func:`worlds.tiny.train_unet.train_attacker_unet`): tiny-sd's UNet
   family with fewer channels (0.72 M parameters, float16), trained from the attacker's seed on latents of the
   attacker VAE (``tiny-vae-ind``, which it needs) of the attacker's own images, conditioned on the public text
   encoder -> ``artifacts/tiny-sd-ind/unet/``; with ``tiny-vae-ind`` and tiny-sd's text encoder, tokenizer and
   scheduler it is the pipeline ``tiny-sd-ind`` (``regen_diffusion`` / ``rinse``'s ``model``). ``--only unet-ind``
   adds it like ``vae-ind``.
6. measure: the quality figures (:mod:`worlds.tiny.evaluate`) -> ``artifacts/manifest.json`` with sizes, sha256
   checksums, training settings, CPU seconds, versions.

Work files (rendered datasets, checkpoints, logs) live in ``--work`` (default ``$MARKBENCH_HOME/zoo-build/seed-N``).
Every training step is seeded by (seed, step), so with the same seed, library versions and thread count a build is
reproducible, and a resumed build follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ARTIFACTS, MANIFEST
from .common import Logger, NullBar, file_sha256

STAGES = ("clip", "vae", "unet", "vae-ind", "unet-ind")
#: the stages that add an attacker model to a shipped world: alone, they leave the manifest's other entries as they are
ATTACKER_STAGES = ("vae-ind", "unet-ind")
#: what each stage ships (``write_manifest_core`` lists and sizes them)
COMPONENTS = ("tiny-sd", "tiny-sd-rt", "tiny-clip", "prebuilt", "tiny-vae-ind", "tiny-sd-ind")
MAX_BYTES = 60_000_000  # the budget: at most 60 MB shipped in all


@dataclass
class BuildPlan:
    seed: int = 0
    work: Path | None = None
    out: Path = ARTIFACTS
    only: str | None = None
    resume: bool = False
    measure: bool = True
    quick_measure: bool = False
    clip: Any = None  # ClipSettings
    vae: Any = None  # VaeSettings
    unet: Any = None  # UnetSettings
    vae_ind: Any = None  # VaeSettings of the attacker VAE (default: train_vae.attacker_vae_settings())
    unet_ind: Any = None  # UnetSettings of the attacker UNet (default: train_unet.attacker_unet_settings())
    extra: dict = field(default_factory=dict)


def work_dir(seed: int) -> Path:
    from .common import default_work_dir

    return default_work_dir() / f"seed-{seed}"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "open-clip-torch", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def file_table(folder: Path) -> dict[str, dict]:
    """``{relative path: {bytes, sha256}}`` of every file under ``folder``."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_folder(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def _ship_clip_half(src: Path, dst: Path) -> None:
    """Ship the trained CLIP (float32 in the work folder) with float16 weights, as :func:`ship` does: half the bytes,
    so that a full build stays within :data:`MAX_BYTES` with the attacker models (its float32 copy alone would take
    9.3 MB more); the UNet stage reads the float32 copy in the work folder."""
    from . import clip_model

    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    clip_model.save(clip_model.load(src), tmp, half=True)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def _readable(out: Path) -> None:
    """safetensors writes files 0600; shipped files are readable by everyone."""
    for p in Path(out).rglob("*"):
        if p.is_file():
            p.chmod(0o644)


def _fresh(path: Path) -> None:
    if path.exists():
        path.unlink()


def build(plan: BuildPlan, bar: NullBar | None = None, log: Logger | None = None) -> dict:
    """Run the plan; return the manifest written to ``plan.out/manifest.json``."""
    from .train_clip import ClipSettings, train_clip
    from .train_unet import UnetSettings, train_attacker_unet, train_unet
    from .train_vae import VaeSettings, train_attacker_vae, train_vae

    bar = bar or NullBar()
    work = Path(plan.work or work_dir(plan.seed))
    out = Path(plan.out)
    log = log or Logger(work / "build.log")
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    training = manifest.setdefault("training", {})
    stages = [plan.only] if plan.only else list(STAGES)
    t_start = time.time()
    log(f"zoo build: seed {plan.seed}, stages {', '.join(stages)}, work {work}, out {out}")
    if "clip" in stages:
        if not plan.resume:
            _fresh(work / "clip" / "checkpoint.pt")
        res = train_clip(work, work / "clip" / "final", plan.seed, plan.clip or ClipSettings(), resume=plan.resume,
                         bar=bar, log=log)
        _ship_clip_half(work / "clip" / "final", out / "tiny-clip")
        training["clip"] = res
    if "vae" in stages:
        if not plan.resume:
            _fresh(work / "vae" / "checkpoint.pt")
            if (work / "vae" / "stage1").exists():
                shutil.rmtree(work / "vae" / "stage1")
        training["vae"] = train_vae(work, work / "vae" / "final", plan.seed, plan.vae or VaeSettings(),
                                    resume=plan.resume, bar=bar, log=log, stage1_out=work / "vae" / "stage1",
                                    roundtrip_out=work / "vae" / "roundtrip")
        if training["vae"]["settings"]["roundtrip_steps"]:
            _copy_folder(work / "vae" / "roundtrip", out / "tiny-sd-rt" / "vae")
    if "unet" in stages:
        for need in (work / "vae" / "stage1", work / "vae" / "final", work / "clip" / "final"):
            if not (need / "config.json").exists() and not (need / "open_clip_config.json").exists():
                raise FileNotFoundError(f"{need} is missing: build the clip and vae stages first")
        if not plan.resume:
            _fresh(work / "unet" / "checkpoint.pt")
        training["unet"] = train_unet(work, work / "unet" / "pipeline", work / "vae" / "stage1",
                                      work / "clip" / "final", plan.seed, plan.unet or UnetSettings(),
                                      resume=plan.resume, bar=bar, log=log, final_vae_dir=work / "vae" / "final")
        _copy_folder(work / "unet" / "pipeline", out / "tiny-sd")
    if "vae-ind" in stages:
        if not plan.resume:
            _fresh(work / "vae-ind" / "vae" / "checkpoint.pt")
        res = train_attacker_vae(work / "vae-ind", work / "vae-ind" / "ship", plan.seed, plan.vae_ind,
                                 resume=plan.resume, bar=bar, log=log)
        _copy_folder(work / "vae-ind" / "ship", out / "tiny-vae-ind")
        training["vae-ind"] = res
    if "unet-ind" in stages:
        for need in (out / "tiny-vae-ind" / "vae", out / "tiny-sd" / "text_encoder", out / "tiny-clip"):
            if not need.exists():
                raise FileNotFoundError(f"{need} is missing: build the clip, vae, unet and vae-ind stages first")
        if not plan.resume:
            _fresh(work / "unet-ind" / "unet" / "checkpoint.pt")
        res = train_attacker_unet(work / "unet-ind", work / "unet-ind" / "ship", out / "tiny-vae-ind" / "vae",
                                  out / "tiny-clip", out / "tiny-sd" / "text_encoder", plan.seed, plan.unet_ind,
                                  resume=plan.resume, bar=bar, log=log,
                                  measure_n=(56 if plan.quick_measure else 168) if plan.measure else 0)
        _copy_folder(work / "unet-ind" / "ship", out / "tiny-sd-ind")
        training["unet-ind"] = res
    for name in stages:
        training[name]["finished"] = True
    _readable(out)
    core = write_manifest_core(out, plan.seed, time.time() - t_start, manifest)
    attacker_only = set(stages) <= set(ATTACKER_STAGES)
    if attacker_only:  # an attacker model added to a shipped world: the other entries stay as they are
        manifest["files"], manifest["total_bytes"] = core["files"], core["total_bytes"]
    else:
        manifest.update(core)
    if (plan.measure and not attacker_only and (out / "tiny-sd" / "model_index.json").exists()
            and (out / "tiny-clip").exists()):
        from .evaluate import check_targets, measure_all

        manifest["quality"] = measure_all(out / "tiny-sd", out / "tiny-clip", quick=plan.quick_measure, log=log)
        manifest["targets_met"] = check_targets(manifest["quality"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    log(f"zoo build done in {time.time() - t_start:.0f} s; manifest {out / 'manifest.json'}")
    return manifest


def ship(work: Path, out: Path = ARTIFACTS, seed: int = 0, measure: bool = True, quick: bool = False,
         log: Logger | None = None) -> dict:
    """Ship the *latest checkpoints* of a build in ``work`` (finished or still running) into ``out``.

    The CLIP comes from its final folder (or checkpoint), the VAE and the UNet (EMA weights) from their latest
    checkpoints; the manifest records each one's step, CPU seconds and settings, so a partly trained model is
    never presented as a finished one.
    """
    import torch

    from . import clip_model
    from .common import load_checkpoint
    from .train_unet import assemble_pipeline, build_unet
    from .train_vae import build_vae

    work, out = Path(work), Path(out)
    log = log or Logger()
    t0 = time.time()
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    training = manifest.setdefault("training", {})

    def info(state: dict, name: str) -> dict:
        s = state.get("settings", {})
        done = state["step"] >= s.get("steps", 0) + s.get("decoder_steps", 0) + s.get("roundtrip_steps", 0)
        return {"settings": s, "seed": seed, "steps": state["step"], "cpu_seconds": round(state["cpu_seconds"], 1),
                "finished": bool(done), "history": state.get("history", []), "source": f"{name} checkpoint"}

    clip_state = load_checkpoint(work / "clip" / "checkpoint.pt")
    if (work / "clip" / "result.json").exists():
        training["clip"] = json.loads((work / "clip" / "result.json").read_text())
        training["clip"]["finished"] = True
        clip = clip_model.load(work / "clip" / "final")
    else:
        clip = clip_model.create()
        clip.load_state_dict(clip_state["model"])
        training["clip"] = info(clip_state, "clip")
    clip.eval()
    clip_model.save(clip, out / "tiny-clip.tmp", half=True)

    vae_state = load_checkpoint(work / "vae" / "checkpoint.pt")
    training["vae"] = info(vae_state, "vae")
    if vae_state.get("stage") == 3:  # the checkpoint is past tiny-sd's VAE: that one was saved at the end of stage 2
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(work / "vae" / "final")
        training["vae"]["finished"] = True
        training["vae"]["note"] = "tiny-sd's VAE from the end of stage 2; tiny-sd-rt not shipped by ship()"
    else:
        vae = build_vae(seed)
        vae.load_state_dict(vae_state["model"])
        vae.register_to_config(scaling_factor=vae_state["scaling_factor"])
    unet_state = load_checkpoint(work / "unet" / "checkpoint.pt")
    unet = build_unet(seed)
    unet.load_state_dict(unet_state["ema"])
    training["unet"] = info(unet_state, "unet")
    training["unet"]["weights"] = "EMA"
    text_encoder = clip_model.to_hf_text_encoder(clip)
    with torch.no_grad():
        pipe = assemble_pipeline(vae.eval(), text_encoder, unet.eval())
    pipe.save_pretrained(out / "tiny-sd.tmp")
    for name in ("tiny-clip", "tiny-sd"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        (out / f"{name}.tmp").rename(out / name)
    _readable(out)
    log(f"shipped from {work}: clip step {training['clip']['steps']}, vae step {training['vae']['steps']}, "
        f"unet step {training['unet']['steps']}")
    manifest.update(write_manifest_core(out, seed, time.time() - t0, manifest))
    if measure:
        from .evaluate import check_targets, measure_all

        manifest["quality"] = measure_all(out / "tiny-sd", out / "tiny-clip", quick=quick, log=log)
        manifest["targets_met"] = check_targets(manifest["quality"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def write_manifest_core(out: Path, seed: int, seconds: float, previous: dict) -> dict:
    """The manifest fields that describe files and provenance (not the quality figures)."""
    from . import shapes

    files = {}
    for comp in COMPONENTS:
        if (out / comp).exists():
            files[comp] = file_table(out / comp)
    total = sum(f["bytes"] for comp in files.values() for f in comp.values())
    if total > MAX_BYTES:
        raise RuntimeError(f"artifacts are {total / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB budget")
    return {
        "format": 1,
        "seed": seed,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "build_seconds_last_run": round(seconds, 1),
        "versions": _versions(),
        "world": {
            "image_size": shapes.IMAGE_SIZE, "shapes": list(shapes.SHAPES), "colours": list(shapes.COLOURS),
            "backgrounds": list(shapes.BACKGROUNDS), "sizes": shapes.SIZES, "styles": list(shapes.STYLES),
            "subject_token": shapes.SUBJECT_TOKEN, "subject_shape": shapes.SUBJECT_SHAPE,
            "caption_grammar": "a {size} {colour} [striped ]{shape} on a {background} background",
            "heldout": "disjoint (shape, colour, background) combinations: one background per (shape, colour) pair, "
                       f"fixed by WORLD_SEED={shapes.WORLD_SEED}; held-out images also use seed+1",
            "n_train_combinations": len(shapes.combinations()[0]),
            "n_heldout_combinations": len(shapes.combinations()[1]),
        },
        "files": files,
        "total_bytes": total,
    }
