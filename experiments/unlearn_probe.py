"""A quick probe of `unlearn` (trigger known) on SleeperMark's shipped tiny-sd-rt embedding, outside the grid: the
bit accuracy of images made with the trigger, before and after unlearning, on a few held-out prompts, and the PSNR
of the model's trigger-free images after unlearning against the same images before (its quality cost, paired).

    python experiments/unlearn_probe.py [STEPS] [N_IMAGES] [LR]

It reads the shipped embedding through the harness (no retraining), applies `unlearn` with the trigger the harness
would hand a trigger-known attack, and detects with the defence's own verifier. A probe for when the full
configs/sleepermark-threats.toml grid does not fit the machine; the grid's numbers (with negatives and quality) are
in docs/threats.md.
"""

from __future__ import annotations

import time

import torch

from markbench import DefenseKnowledge, GenerationRequest, model_attacks
from markbench.cache import ArtifactStore, shipped_stores
from markbench.config import load_config
from markbench.plan import build_plan
from markbench.prompts import read_prompts
from markbench.stages import StageEnv, copy_pipeline


def main(steps: int = 20, n: int = 4, lr: float = 1e-3) -> None:
    cfg = load_config("configs/sleepermark-threats.toml")
    plan = build_plan(cfg)
    env = StageEnv(cfg, plan, ArtifactStore(cfg.cache_dir, fallbacks=shipped_stores()))
    embed = next(s for s in plan.stages.values() if s.kind == "embed" and s.plugin.name == "sleepermark")
    defense = env.plugin(embed.plugin)
    secret = env.secret(embed.key)
    prompts = tuple(read_prompts("tiny:heldout")[:n])
    req = GenerationRequest(prompts=prompts, seeds=tuple(range(n)), height=64, width=64, num_inference_steps=20,
                            guidance_scale=7.5, batch_size=n)
    message = defense.message(secret)

    def bit_acc(pipe) -> list[float]:
        ctx = env.context(embed)
        images = defense.generate(pipe, secret, req, ctx)
        bits = defense.detect(secret, images, ctx).bits
        return (bits == message[None]).float().mean(1).tolist()

    def plain(pipe) -> torch.Tensor:  # the model's ordinary (trigger-free) images, same prompts and seeds
        return env.context(embed).generate(pipe, req)

    pipe = copy_pipeline(env.pipeline(embed.key))
    t0 = time.perf_counter()
    before = bit_acc(pipe)
    plain_before = plain(pipe)
    t1 = time.perf_counter()
    ctx = env.context(embed)
    ctx.knowledge = DefenseKnowledge("trigger_known", method="sleepermark", trigger=defense.known_trigger(secret))
    model_attacks.get("unlearn")(steps=steps, lr=lr).apply(pipe, ctx)
    t2 = time.perf_counter()
    after = bit_acc(pipe)
    mse = float(((plain(pipe) - plain_before) ** 2).mean())
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
    print(f"unlearn steps={steps} lr={lr:g} n={n}: bit accuracy with the trigger before "
          f"{sum(before) / n:.3f} {[round(x, 3) for x in before]}, after {sum(after) / n:.3f} "
          f"{[round(x, 3) for x in after]}; trigger-free images after vs before: PSNR {psnr:.1f} dB; unlearn "
          f"{t2 - t1:.0f} s, generation+detection {t1 - t0:.0f} s")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m experiments.unlearn_probe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="unlearn (trigger known) on SleeperMark's shipped tiny-sd-rt embedding, outside the grid.",
        epilog="examples:\n  python -m experiments.unlearn_probe              20 steps, 4 images, lr 1e-3\n"
               "  python -m experiments.unlearn_probe 200 8 3e-4")
    ap.add_argument("steps", nargs="?", type=int, default=20, help="unlearning steps (default 20)")
    ap.add_argument("n", nargs="?", type=int, default=4, help="held-out prompts / images (default 4)")
    ap.add_argument("lr", nargs="?", type=float, default=1e-3, help="learning rate (default 1e-3)")
    args = ap.parse_args()
    torch.manual_seed(0)
    main(args.steps, args.n, args.lr)
