"""Can the tiny world carry the downstream style at all? (issue 24: where is the style lost?)

A fine-tune of the UNet can only teach what the VAE can represent: if the real style images, encoded and decoded
by the pipeline's VAE, no longer read as the style, no UNet fine-tune can learn it. For the held-out style captions
(the ``attacker_utility`` metric's captions: seed 1 draws) this measures the tiny CLIP's recognition (recogniser v2:
the style AND the caption's shape and colour) of

* ``real``: the rendered style images themselves (64 px);
* ``vae <model>``: their VAE round trip (posterior mean, decode) through each shipped pipeline's VAE (``tiny-sd``:
  the one every UNet fine-tune decodes through; ``tiny-sd-rt``: its round-trip-trained decoder);
* ``sdedit <s>``: the round trip noised to strength ``s`` of the sampler's schedule and denoised by the clean base
  with the run's sampler settings (20 DDIM steps, guidance 7.5, the striped caption): what the sampler keeps of a
  style it is shown but never learnt;

``--variants`` instead renders the same items with other stripe designs (period, duty, outline width, direction,
what fills the gaps: a style the VAE might carry better) and measures each real and after the ``tiny-sd`` VAE;

with the three parts of the question separately (striped and content: the metric; content alone; the style question
alone), the PSNR of each image set against the real images, and a PNG grid (rows in the order above).

    nice -n 10 python -m experiments.style_representable [--dataset tiny:style] [--n 32]
        [--out experiments/results/representable.json] [--png docs/img/style_representable.png]
    nice -n 10 python -m experiments.style_representable --variants --n 64 \
        --out experiments/results/representable-variants.json --png docs/img/style_variants.png --cell 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from dataclasses import replace


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def sdedit(pipe, latents: torch.Tensor, captions: list[str], strength: float, steps: int, guidance: float,
           seed: int) -> torch.Tensor:
    """DDIM from the clean latents noised to ``strength`` of the schedule, with classifier-free guidance."""
    from markbench.training import decode_latents, encode_prompts

    sched = pipe.scheduler
    sched.set_timesteps(steps)
    ts = sched.timesteps[int(round(steps * (1 - strength))):]
    if len(ts) == 0:
        return decode_latents(pipe, latents).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    x = sched.add_noise(latents, noise, ts[:1].repeat(latents.shape[0]))
    cond = encode_prompts(pipe, captions)
    uncond = encode_prompts(pipe, [""] * len(captions))
    with torch.no_grad():
        for t in ts:
            eps = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        return decode_latents(pipe, x).clamp(0, 1)


#: stripe designs probed by --variants: (period px at 64 px, fg duty, outline px, direction, gap fill)
VARIANTS = [
    (8, 0.5, 2, "diag", "bg"),  # tiny:style itself
    (8, 0.5, 4, "diag", "bg"), (8, 0.65, 3, "diag", "bg"), (8, 0.5, 0, "diag", "bg"),
    (10, 0.5, 2, "diag", "bg"), (12, 0.5, 2, "diag", "bg"), (16, 0.5, 2, "diag", "bg"), (20, 0.5, 2, "diag", "bg"),
    (12, 0.65, 4, "diag", "bg"), (16, 0.75, 3, "diag", "bg"), (24, 0.75, 3, "diag", "bg"),
    (8, 0.5, 2, "horizontal", "bg"), (8, 0.5, 2, "vertical", "bg"),
    (8, 0.5, 2, "diag", "dark"), (8, 0.5, 2, "diag", "black"), (8, 0.5, 2, "diag", "white"),
    (16, 0.5, 2, "diag", "dark"), (16, 0.5, 2, "diag", "light"),
]


def render_variant(item, period: float, duty: float, outline: float, direction: str, gap: str,
                   size: int = 64) -> np.ndarray:
    """``item`` drawn like :func:`worlds.tiny.shapes.render`'s striped style, with another stripe design (a probe
    renderer: the world's own renderer is unchanged). ``gap``: what fills the gaps between the stripes inside the
    shape: ``bg`` (the background, as tiny:style), ``dark`` / ``light`` (the shape's colour darkened / lightened),
    ``black``, ``white``; with a gap other than ``bg`` the silhouette stays solid and the outline is the shape's colour."""
    from PIL import Image, ImageDraw

    from markbench.worlds.tiny import shapes

    ss = shapes.SUPERSAMPLE
    big = size * ss
    bg = np.asarray(shapes.BACKGROUNDS[item.background], np.float32)
    fg = np.asarray(shapes.COLOURS[item.colour], np.float32)
    half = shapes.SIZES[item.size] * size * ss / 2
    cx, cy = big / 2 + item.dx * ss * size / 64, big / 2 + item.dy * ss * size / 64
    poly = shapes._outline(item.shape)
    box = (cx - half, cy - half, cx + half, cy + half)
    pts = None if poly is None else [(cx + half * x, cy + half * y) for x, y in poly]

    def draw(**kw) -> np.ndarray:
        im = Image.new("L", (big, big), 0)
        d = ImageDraw.Draw(im)
        d.ellipse(box, **kw) if pts is None else d.polygon(pts, **kw)
        return np.asarray(im, np.float32) / 255

    m = draw(fill=255)
    e = draw(outline=255, width=int(round(outline * ss))) if outline > 0 else np.zeros_like(m)
    yy, xx = np.mgrid[0:big, 0:big]
    coord = {"diag": xx + yy, "horizontal": yy, "vertical": xx}[direction]
    p = period * ss
    st = ((coord % p) < p * duty).astype(np.float32)
    if gap == "bg":
        m = np.maximum(m * st, np.minimum(m, e))
        img = (1 - m)[..., None] * bg + m[..., None] * fg
    else:
        fill = {"dark": fg * 0.35, "light": fg + 0.6 * (255 - fg), "black": np.zeros(3, np.float32),
                "white": np.full(3, 255.0, np.float32)}[gap]
        inner = np.maximum(st, e)[..., None] * fg + (1 - np.maximum(st, e))[..., None] * fill
        img = (1 - m)[..., None] * bg + m[..., None] * inner
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def measure(rec, task, imgs: torch.Tensor, caps: list[str], real: torch.Tensor, label: str) -> dict:
    from markbench import stats

    imgs = (imgs * 255).round() / 255  # what a saved image holds
    hits = rec.hits(task, imgs, caps)
    content = rec.content_hits(imgs, caps, shape=task.kind == "style")
    est = stats.rate(int(hits.sum()), int(hits.size))
    row = {"images": label, "recognition": est.value, "low": est.low, "high": est.high, "n": est.n,
           "content": float(content.mean()), "psnr_vs_real": psnr(imgs, real)}
    if task.kind == "style":
        f = rec._image(imgs)
        w = rec._text(caps)
        wo = rec._text([c.replace("striped ", "") for c in caps])
        row["style_alone"] = float(((f * w).sum(1) > (f * wo).sum(1)).float().mean())
    print(f"{label:36s} recognised {est.value:.3f} [{est.low:.3f}, {est.high:.3f}]  content {row['content']:.3f}"
          f"  style alone {row.get('style_alone', float('nan')):.3f}  PSNR {row['psnr_vs_real']:.1f} dB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="tiny:style")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--strengths", default="0.3,0.6")
    ap.add_argument("--out", default="experiments/results/representable.json")
    ap.add_argument("--png", default="docs/img/style_representable.png")
    ap.add_argument("--cols", type=int, default=8, help="images per row of the figure")
    ap.add_argument("--cell", type=int, default=128, help="pixels per image in the figure")
    ap.add_argument("--variants", action="store_true", help="other stripe designs, real and after the VAE")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from PIL import Image

    from markbench.config import load_config
    from markbench.downstream import eval_captions, task_of
    from markbench.models import load_pipeline
    from markbench.training import decode_latents, encode_images
    from markbench.world import get_world, split_spec
    from markbench.worlds.tiny.downstream import Recogniser

    task = task_of(args.dataset)
    caps = eval_captions(task, args.n)
    world, name = split_spec(args.dataset)
    real, real_caps = get_world(world).load_dataset(name, args.n, seed=1)
    assert list(real_caps) == caps, "the held-out captions are the seed-1 items of the split"
    rec = Recogniser.shared()
    cfg = load_config("configs/finetune.toml", check_output=False)
    rows: list[tuple[str, torch.Tensor, torch.Tensor]] = [("real", real, real)]
    if args.variants:
        from markbench.worlds.tiny import shapes

        pipe = load_pipeline(cfg.model)
        items = shapes.sample_items(name, args.n, seed=1)
        rows = []
        for v in VARIANTS:
            x = torch.from_numpy(np.stack([render_variant(it, *v) for it in items])).permute(0, 3, 1, 2).float() / 255
            label = "period {} duty {} outline {} {} gap {}".format(*v)
            rows.append((label + " real", x, x))
            with torch.no_grad():
                rows.append((label + " vae", decode_latents(pipe, encode_images(pipe, x)).clamp(0, 1), x))
    pipes = {}
    for model in () if args.variants else ("tiny-sd", "tiny-sd-rt"):
        pipes[model] = load_pipeline(replace(cfg.model, builtin=model))
        with torch.no_grad():
            lat = encode_images(pipes[model], real)
            rows.append((f"vae {model}", decode_latents(pipes[model], lat).clamp(0, 1), real))
    for s in (float(x) for x in args.strengths.split(",") if x and not args.variants):
        lat = encode_images(pipes["tiny-sd"], real)
        rows.append((f"sdedit {s} (tiny-sd)", sdedit(pipes["tiny-sd"], lat, caps, s, cfg.model.num_inference_steps,
                                                       cfg.model.guidance_scale, 0), real))
    out = {"dataset": args.dataset, "n": args.n,
           "rows": [measure(rec, task, imgs, caps, ref, label) for label, imgs, ref in rows]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    k = min(args.cols, args.n)
    grid = torch.cat([torch.cat(list(imgs[:k]), 2) for _, imgs, _ in rows], 1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
        (k * args.cell, len(rows) * args.cell), Image.NEAREST).save(args.png)
    print("rows:", [label for label, _, _ in rows], "->", args.png)


if __name__ == "__main__":
    main()
