"""The tier-1 trigger search (`trigger_search`, method known) on SleeperMark's shipped tiny-sd-rt embedding, outside
the grid, with what only the harness can measure: whether the found string is the trigger, and whether it wakes the
mark (bit accuracy, read with the true key, of images made with it).

    python -m experiments.trigger_search_probe [--n 4] [--steps 20] [--clean] [--followup] [--out F]

1. The search on the marked model (and, with ``--clean``, on the clean base: does it claim a trigger there?), with
   the parameters of the ``trigger_search`` entry of configs/sleepermark-threats.toml (``--steps`` overrides).
2. The found tokens against the true trigger's tokens (the attack never sees them; the harness compares).
3. Bit accuracy (true key) of ``--n`` held-out prompts' images from the marked model: without a trigger, with the
   true trigger, with the found string where the method puts its trigger.
4. With ``--followup`` and a claimed trigger: the attack's follow-up (``unlearn`` driven by the found string) on the
   marked model, then bit accuracy with the true trigger and with the found string, and the PSNR of the model's
   trigger-free images against the same images before (a change, not a quality measure: the grid measures quality).

Writes the figures as JSON (``--out``) and prints one line per measurement.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from markbench import GenerationRequest, model_attacks
from markbench.cache import ArtifactStore, shipped_stores
from markbench.config import load_config
from markbench.plan import build_plan
from markbench.prompts import read_prompts
from markbench.stages import StageEnv, copy_pipeline

CONFIG = "configs/sleepermark-threats.toml"


def main(n: int, steps: int | None, clean: bool, followup: bool, out: str | None) -> dict:
    cfg = load_config(CONFIG)
    plan = build_plan(cfg)
    env = StageEnv(cfg, plan, ArtifactStore(cfg.cache_dir, fallbacks=shipped_stores()))
    embed = next(s for s in plan.stages.values() if s.kind == "embed" and s.plugin.name == "sleepermark")
    base_key = next(s.key for s in plan.stages.values() if s.kind == "base")
    search_stage = next(s for s in plan.stages.values()
                        if s.kind == "model_attack" and s.plugin.name == "trigger_search" and s.inputs[0] == embed.key)
    params = search_stage.plugin.param_dict
    if steps is not None:
        params["steps"] = steps
    cls = model_attacks.get("trigger_search")
    defense = env.plugin(embed.plugin)
    secret = env.secret(embed.key)  # the harness's measurement only: the attack gets a sealed view
    true = defense.known_trigger(secret)
    tok = env.pipeline(embed.key).tokenizer
    true_ids = list(tok((true.prompt_prefix or true.prompt_suffix).strip(), add_special_tokens=False).input_ids)
    prompts = tuple(read_prompts(cfg.prompts.set)[:n])
    req = GenerationRequest(prompts=prompts, seeds=tuple(range(n)), height=cfg.model.height, width=cfg.model.width,
                            num_inference_steps=cfg.model.num_inference_steps,
                            guidance_scale=cfg.model.guidance_scale, batch_size=n)
    message = defense.message(secret)

    def bit_acc(pipe, wrap) -> float:
        ctx = env.context(embed)
        images = ctx.generate(pipe, dataclasses.replace(req, prompts=tuple(wrap(p) for p in prompts)))
        bits = defense.detect(secret, images, ctx).bits
        return float((bits == message[None]).float().mean())

    report: dict = {"params": params, "true_trigger": (true.prompt_prefix or true.prompt_suffix).strip(),
                    "true_tokens": true_ids, "n_images": n}
    models = [("marked", embed.key)] + ([("clean", base_key)] if clean else [])
    for name, key in models:
        pipe = copy_pipeline(env.pipeline(key))
        ctx = env.context(search_stage)
        t0 = time.perf_counter()
        found = cls(**params).search(pipe, ctx)
        secs = time.perf_counter() - t0
        trig = found.pop("trigger")
        found["seconds"] = round(secs, 1)
        found["exact_match"] = found["tokens"] == true_ids
        found["shared_tokens"] = sorted(set(found["tokens"]) & set(true_ids))
        report[name] = found
        print(f"{name}: found {found['found']!r} (tokens {found['tokens']}; true {true_ids}), S {found['S']:.4g}, "
              f"rho {found['rho']:.3f}, null S {found['null_S']:.4g} (gain {found['gain']:.1f}), claimed "
              f"{found['claimed']}; {found['unet_evaluations']} UNet evaluations, {secs:.0f} s", flush=True)
        if name != "marked":
            continue
        as_found = (lambda p: f"{found['found']} {p}") if params.get("position", "prefix") == "prefix" else \
            (lambda p: f"{p} {found['found']}")
        accs = {"no_trigger": bit_acc(pipe, lambda p: p), "true_trigger": bit_acc(pipe, true.apply),
                "found": bit_acc(pipe, as_found)}
        report["bit_accuracy_before"] = accs
        print(f"bit accuracy (true key, {n} images): no trigger {accs['no_trigger']:.3f}, true trigger "
              f"{accs['true_trigger']:.3f}, found string {accs['found']:.3f}", flush=True)
        if followup and trig is not None:
            plain_before = env.context(embed).generate(pipe, req)
            ctx = env.context(search_stage)
            t0 = time.perf_counter()
            cls(**params).apply(pipe, ctx)
            secs = time.perf_counter() - t0
            after = {"true_trigger": bit_acc(pipe, true.apply), "found": bit_acc(pipe, as_found)}
            mse = float(((env.context(embed).generate(pipe, req) - plain_before) ** 2).mean())
            after["psnr_trigger_free_vs_before"] = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
            after["seconds"] = round(secs, 1)
            after["costs"] = {k: v for k, v in ctx.costs.items() if not isinstance(v, (list, dict))}
            report["after_followup"] = after
            print(f"after the follow-up (search + unlearn, {secs:.0f} s): bit accuracy with the true trigger "
                  f"{after['true_trigger']:.3f}, with the found string {after['found']:.3f}; trigger-free images vs "
                  f"before: PSNR {after['psnr_trigger_free_vs_before']:.1f} dB", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m experiments.trigger_search_probe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="trigger_search (method known) on SleeperMark's shipped tiny-sd-rt embedding, outside the grid.",
        epilog="example:\n  python -m experiments.trigger_search_probe --n 4 --clean --followup "
               "--out experiments/results/trigger_search.json")
    ap.add_argument("--n", type=int, default=4, help="held-out prompts / images for bit accuracy (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="search rounds (default: the config's)")
    ap.add_argument("--clean", action="store_true", help="also search the clean base model")
    ap.add_argument("--followup", action="store_true", help="also run the follow-up (unlearn with the found string)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    main(a.n, a.steps, a.clean, a.followup, a.out)
