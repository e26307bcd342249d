"""The tiny world's quality figures, measured on built or shipped artifacts.

* CLIP: zero-shot accuracy (shape, colour, background, size) on held-out images (held-out combinations, seed+1).
* VAE: mean per-image PSNR of the uint8 round trip on held-out base images, the downstream style and subject.
* LDM: images generated for held-out captions (DDIM, 20 steps), classified zero-shot by the tiny CLIP:
  shape-and-colour accuracy with and without classifier-free guidance.

The pipeline is loaded through :func:`bench.models.load_pipeline_folder`, the function a real SD folder goes through.
"""

from __future__ import annotations

from pathlib import Path

from . import TINY_CLIP, TINY_SD

#: what the issue asks of the shipped models
TARGETS = {"clip_shape": 0.90, "clip_colour": 0.90, "vae_psnr_db": 28.0, "ldm_shape_and_colour": 0.70}


def measure_clip(clip_dir: Path = TINY_CLIP, n: int = 1000, seed: int = 0) -> dict:
    from . import clip_model, shapes

    model = clip_model.load(clip_dir)
    images, captions, _ = shapes.make_dataset("heldout", n, seed + 1)
    return clip_model.ZeroShot(model).accuracy(images, captions)


def measure_vae(sd_dir: Path = TINY_SD, n: int = 256, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL

    from . import shapes
    from .train_vae import psnr_round_trip

    vae = AutoencoderKL.from_pretrained(str(Path(sd_dir) / "vae"), local_files_only=True).eval()
    out = {}
    for split in ("heldout", "style", "subject"):
        images, _, _ = shapes.make_dataset(split, n, seed + 1)
        out[split] = round(psnr_round_trip(vae, images), 2)
    out["n"] = n
    return out


def measure_ldm(sd_dir: Path = TINY_SD, clip_dir: Path = TINY_CLIP, n: int = 168, guidances=(1.0, 3.0, 5.0),
                steps: int = 20, seed: int = 0) -> dict:
    from markbench.models import load_pipeline_folder
    from . import clip_model
    from .train_unet import evaluate_pipeline

    pipe = load_pipeline_folder(sd_dir)
    zs = clip_model.ZeroShot(clip_model.load(clip_dir))
    res = evaluate_pipeline(pipe, zs, n=n, guidances=guidances, steps=steps, seed=seed)
    res["num_inference_steps"] = steps
    return res


def measure_all(sd_dir: Path = TINY_SD, clip_dir: Path = TINY_CLIP, quick: bool = False, log=None) -> dict:
    log = log or (lambda m: None)
    log("measuring CLIP zero-shot accuracy")
    clip = measure_clip(clip_dir, n=200 if quick else 1000)
    log("measuring VAE PSNR")
    vae = measure_vae(sd_dir, n=64 if quick else 256)
    log("measuring LDM prompt accuracy")
    ldm = measure_ldm(sd_dir, clip_dir, n=56 if quick else 168)
    return {"clip_zero_shot_heldout": clip, "vae_psnr_db": vae, "ldm_heldout_accuracy": ldm}


def check_targets(q: dict) -> dict[str, bool]:
    """Which of the issue's targets the figures ``q`` (from :func:`measure_all`) meet."""
    ldm = q["ldm_heldout_accuracy"]
    cfg = [k for k in ldm if k.startswith("cfg") and k != "cfg1"]
    best = max((ldm[k]["shape_and_colour"] for k in cfg), default=0.0)
    return {
        "clip shape >= 90%": q["clip_zero_shot_heldout"]["shape"] >= TARGETS["clip_shape"],
        "clip colour >= 90%": q["clip_zero_shot_heldout"]["colour"] >= TARGETS["clip_colour"],
        "vae PSNR >= 28 dB": q["vae_psnr_db"]["heldout"] >= TARGETS["vae_psnr_db"],
        "ldm shape+colour >= 70%": best >= TARGETS["ldm_shape_and_colour"],
        "cfg beats no cfg": best > ldm["cfg1"]["shape_and_colour"],
    }


def main(argv=None) -> int:
    """``python -m worlds.tiny.evaluate --work WORK [--n N]``: LDM accuracy of the latest UNet checkpoint (EMA)."""
    import argparse
    import json

    import torch

    from .train_unet import export_checkpoint

    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--n", type=int, default=56)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    vae = work / "vae" / "final" if (work / "vae" / "final" / "config.json").exists() else work / "vae" / "stage1"
    out = work / "unet" / "latest-pipeline"
    step = export_checkpoint(work, out, vae, work / "clip" / "final")
    res = measure_ldm(out, work / "clip" / "final", n=a.n, guidances=tuple(a.guidance))
    print(json.dumps({"step": step, "vae": str(vae), **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
