"""Can any text encoder teach the frozen tiny UNet the new subject? (issue 24: why ``text_encoder`` learns no arrow)

A text-encoder fine-tune changes only what the UNet is conditioned on: for each caption, one ``[77, D]`` tensor of
hidden states. So the best any text encoder could do for a set of captions is bounded by the best *free*
conditioning: one unconstrained tensor per image, optimised directly with the denoising loss on that image (the UNet
and VAE frozen). That is more than a text encoder can give (it must produce all of them from one network, and
generalise to held-out captions), so if the frozen UNet does not draw the subject even under it, no text-encoder
fine-tune can teach it.

For ``--n`` training items of ``tiny:subject`` (seed 0: the attacks' own draws), this optimises one conditioning per
image (initialised at the clean text encoder's output for its caption; AdamW, ``--lr``, batch 4, ``--steps``), then
samples each image's caption with its conditioning (the pipeline: 20 DDIM steps, guidance 7.5 against the empty
prompt, 64 px, a fixed seed per image) and asks the tiny CLIP whether it shows the subject with the caption's colour
(the ``attacker_utility`` recogniser), before and after, with the denoising loss on the items.

    nice -n 10 python -m experiments.conditioning_bound [--n 32] [--steps 400] [--lr 1e-2]
        [--out experiments/results/conditioning-bound.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", default="experiments/results/conditioning-bound.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from markbench import stats
    from markbench.config import load_config
    from markbench.downstream import recognised, task_of
    from markbench.models import load_pipeline
    from markbench.training import diffusion_loss, encode_images, encode_prompts, sample_batches, train_loop
    from markbench.worlds.tiny import shapes

    cfg = load_config("configs/finetune.toml", check_output=False)
    pipe = load_pipeline(cfg.model)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    task = task_of("tiny:subject")
    real, caps, _ = shapes.make_dataset("subject", args.n, seed=0, size=cfg.model.height)
    with torch.no_grad():
        lat = encode_images(pipe, (shapes.to_tensor(real) + 1) / 2)
        cond0 = encode_prompts(pipe, caps)
        uncond = encode_prompts(pipe, [""] * args.n)

    def loss_of(cond: torch.Tensor) -> float:
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            return sum(float(diffusion_loss(pipe.unet, pipe.scheduler, lat, cond, g)) for _ in range(4)) / 4

    def measure(cond: torch.Tensor) -> dict:
        with torch.no_grad():
            out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=20,
                       guidance_scale=7.5, height=cfg.model.height, width=cfg.model.width, output_type="pt",
                       generator=[torch.Generator().manual_seed(i) for i in range(args.n)])
        hits = recognised(task, out.images.float().clamp(0, 1), caps)
        est = stats.rate(int(hits.sum()), int(hits.size))
        return {"recognition": est.value, "low": est.low, "high": est.high, "n": est.n, "loss": loss_of(cond)}

    rows = [{"conditioning": "clean text encoder", "steps": 0, **measure(cond0)}]
    print(rows[-1], flush=True)
    cond = torch.nn.Parameter(cond0.clone())
    g = torch.Generator().manual_seed(0)
    batches = sample_batches(args.n, 4, g)

    def step(_):
        idx = next(batches)
        return diffusion_loss(pipe.unet, pipe.scheduler, lat[idx], cond[idx], g)

    t0 = time.perf_counter()
    train_loop([cond], step, args.steps, args.lr, None, "free conditioning", weight_decay=0.0)
    rows.append({"conditioning": "free, optimised per image", "steps": args.steps, "lr": args.lr,
                 "train_s": time.perf_counter() - t0, **measure(cond.detach())})
    print(rows[-1], flush=True)
    # the real items themselves through the VAE, as the ceiling the recogniser gives this task here
    with torch.no_grad():
        from markbench.training import decode_latents

        ceiling = recognised(task, decode_latents(pipe, lat).clamp(0, 1), caps)
    est = stats.rate(int(ceiling.sum()), int(ceiling.size))
    rows.append({"conditioning": "(the items' own VAE round trip)", "steps": 0, "recognition": est.value,
                 "low": est.low, "high": est.high, "n": est.n})
    Path(args.out).write_text(json.dumps({"dataset": "tiny:subject", "n": args.n, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
