"""Calibration of the training attacks on the clean tiny-world base (issue 24): does each fine-tune learn its data?

For each setting (attack, lr, rank, ...) one training run on the clean ``tiny-sd`` base, exactly the attack's own
``apply`` (its data, loss, optimiser and random stream), is evaluated at checkpoints along the way (the step loop is
observed through ``ctx.progress``: at checkpoint ``s`` the model has taken ``s`` steps, and the constant-lr AdamW loop
draws nothing from the generator in between, so the model equals that of an attack configured with ``steps = s``):

* ``recognition``: the share of images, generated for the task's held-out captions exactly as the harness's
  ``attacker_utility`` metric generates them (:func:`bench.plan.downstream_request`, run seed 0, the finetune
  config's sampler settings), in which the tiny CLIP recognises the new style or subject (Clopper-Pearson 95 %);
* ``heldout_loss``: the denoising loss on held-out downstream images (the task's seed-1 images: the attacks train on
  seed 0's), at fixed noise and timesteps (the same draws at every checkpoint), mean over ``--loss-repeats`` draws.

Step 0 is the clean base. Results go to a JSON file, one entry per (setting, checkpoint), written as they come;
a rerun skips settings already complete (resumable). ``experiments/calibration_report.py`` renders
``docs/calibration.md`` and its figure from it.

    nice -n 19 python -m experiments.calibration [--out experiments/results/calibration.json] [--only lora]
           [--n 32] [--time-step]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

CONFIG = "configs/finetune.toml"
STYLE_CKPTS = (20, 200, 600, 2000)

#: (attack, params, checkpoints). The LoRA rows sweep lr x rank; the SD defaults (lr 1e-4) are the reference.
SETTINGS: list[tuple[str, dict, tuple[int, ...]]] = [
    ("lora", {"dataset": "tiny:style", "rank": 20, "alpha": 20.0, "lr": 1e-3}, STYLE_CKPTS),
    ("lora", {"dataset": "tiny:style", "rank": 20, "alpha": 20.0, "lr": 3e-3}, STYLE_CKPTS),
    ("lora", {"dataset": "tiny:style", "rank": 20, "alpha": 20.0, "lr": 1e-2}, STYLE_CKPTS),
    ("lora", {"dataset": "tiny:style", "rank": 64, "alpha": 64.0, "lr": 3e-3}, STYLE_CKPTS),
    ("finetune", {"dataset": "tiny:style", "lr": 1e-3}, (20, 200, 600)),
    ("dreambooth", {"dataset": "tiny:subject", "lr": 1e-4, "num_class_images": 32}, (20, 200, 400)),
    ("lora", {"dataset": "tiny:style", "rank": 20, "alpha": 20.0, "lr": 1e-4}, (20, 200)),
    ("text_encoder", {"dataset": "tiny:style", "lr": 1e-4}, (20, 200, 600)),
    ("text_encoder", {"dataset": "tiny:style", "lr": 1e-3}, (20, 200, 600)),
    # v3 (2026-12-07): tiny:style is capped by the VAE (experiments/style_representable.py); the style fine-tunes
    # on tiny:subject, the new concept the tiny world carries, at the published defaults first
    ("lora", {"dataset": "tiny:subject", "rank": 20, "alpha": 20.0, "lr": 1e-4}, (20, 200)),
    ("finetune", {"dataset": "tiny:subject", "lr": 1e-4}, (20, 200)),
    ("lora", {"dataset": "tiny:subject", "rank": 20, "alpha": 20.0, "lr": 1e-3}, (20, 200, 600, 800, 2000)),
    ("lora", {"dataset": "tiny:style", "rank": 64, "alpha": 64.0, "lr": 1e-3}, (20, 200, 600)),
    # the attacks still on tiny:style, moved to the subject: the text encoder alone (the UNet never drew an arrow),
    # and the sequential fine-tune (style, then subject) at the tiny world's full fine-tuning lr (one checkpoint:
    # its step loop runs twice, once per phase, so only its end is a model of a configured `steps`)
    ("text_encoder", {"dataset": "tiny:subject", "lr": 1e-3}, (20, 200)),
    ("sequential_finetune", {"first": "tiny:style", "dataset": "tiny:subject", "lr": 1e-4}, (200,)),
]


def setting_key(attack: str, params: dict) -> str:
    return attack + "(" + ", ".join(f"{k}={params[k]}" for k in sorted(params)) + ")"


class Evaluator:
    """Recognition of the task on held-out captions (as the harness measures it) and held-out denoising loss."""

    def __init__(self, cfg, n: int, loss_repeats: int):
        from markbench.downstream import eval_captions, task_of
        from markbench.plan import downstream_request

        self.cfg, self.n, self.loss_repeats = cfg, n, loss_repeats
        self.tasks = {}
        for split in ("style", "subject"):
            task = task_of(f"tiny:{split}")
            caps = eval_captions(task, n)
            self.tasks[f"tiny:{split}"] = (task, caps, downstream_request(cfg, 0, caps))

    def __call__(self, pipe, dataset: str) -> dict:
        from markbench import stats
        from markbench.downstream import LOSS_PROTOCOL, heldout_data, heldout_loss, recognised
        from markbench.generation import generate_images

        task, caps, request = self.tasks[dataset]
        unet = pipe.unet
        was_training = unet.training
        unet.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            images = generate_images(pipe, request)
            hits = recognised(task, images, caps)
            est = stats.rate(int(hits.sum()), int(hits.size))
            real, real_caps = heldout_data(dataset, self.n, self.cfg.model.height, self.cfg.model.width,
                                           data_seed=LOSS_PROTOCOL["data_seed"])
            losses = heldout_loss(pipe, real, real_caps, noise_seed=LOSS_PROTOCOL["noise_seed"],
                                  repeats=self.loss_repeats)
        if was_training:
            unet.train()
        return {"recognition": est.value, "low": est.low, "high": est.high, "n": est.n,
                "heldout_loss": float(losses.double().mean()), "eval_s": time.perf_counter() - t0}


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"config": CONFIG, "rows": []}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_setting(attack_name: str, params: dict, ckpts: tuple[int, ...], base, evaluate, data: dict, path: Path,
                seed: int) -> None:
    from markbench import model_attacks
    from markbench.plugins import StageContext
    from markbench.testing import Resources, copy_pipeline

    key = setting_key(attack_name, params)
    dataset = params["dataset"]
    done = {(r["setting"], r["steps"], r.get("seed", 0)) for r in data["rows"]}
    if all((key, s, seed) in done for s in ckpts):
        print(f"{key} seed {seed}: done")
        return
    # checkpoints already measured are kept and not measured again (the training run is the same: one seed, a
    # constant-lr loop), so more checkpoints extend a setting's rows; measured checkpoints no longer listed go
    data["rows"] = [r for r in data["rows"] if not (r["setting"] == key and r.get("seed", 0) == seed
                                                    and r["steps"] not in ckpts)]
    measured = {s for s in ckpts if (key, s, seed) in done}
    pipe = copy_pipeline(base)
    t_train = [0.0]
    t_start = time.perf_counter()

    def record(steps: int, p) -> None:
        t_train[0] = time.perf_counter() - t_start
        row = {"setting": key, "attack": attack_name, "params": params, "steps": steps, "seed": seed,
               "train_s": t_train[0], **evaluate(p, dataset)}
        data["rows"].append(row)
        save(path, data)
        print(f"{key} seed {seed} step {steps}: recognition {row['recognition']:.3f} "
              f"loss {row['heldout_loss']:.4f} ({row['train_s']:.0f} s)", flush=True)

    def progress(it, total=None, description=""):
        nonlocal t_start
        for i in it:
            if i in ckpts and i < max(ckpts) and i not in measured:
                paused = time.perf_counter()
                record(i, pipe)
                t_start += time.perf_counter() - paused  # training time excludes evaluation
            yield i

    attack = model_attacks.get(attack_name)(steps=max(ckpts), **params)
    ctx = StageContext(torch.Generator().manual_seed(seed), progress=progress,
                       data=Resources(lambda: base, 64, 64))
    pipe = attack.apply(pipe, ctx)
    if max(ckpts) not in measured:
        record(max(ckpts), pipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results/calibration.json")
    ap.add_argument("--only", default=None, help="comma-separated attack names")
    ap.add_argument("--index", default=None, help="comma-separated indices into SETTINGS (to split over processes)")
    ap.add_argument("--n", type=int, default=32, help="images per recognition measurement")
    ap.add_argument("--loss-repeats", type=int, default=4)  # the harness's: bench.downstream.LOSS_PROTOCOL
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-step", action="store_true", help="time 10 LoRA steps and one evaluation, then exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from markbench.config import load_config
    from markbench.models import load_pipeline

    cfg = load_config(CONFIG, check_output=False)
    base = load_pipeline(cfg.model)
    evaluate = Evaluator(cfg, args.n, args.loss_repeats)
    path = Path(args.out)
    data = load(path)
    data["n"] = args.n
    if args.time_step:
        from markbench import model_attacks
        from markbench.plugins import StageContext
        from markbench.testing import Resources, copy_pipeline

        for name, kw in (("lora", {"rank": 20}), ("lora", {"rank": 64, "alpha": 64.0}), ("finetune", {})):
            ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: base, 64, 64))
            t0 = time.perf_counter()
            model_attacks.get(name)(steps=1, **kw).apply(copy_pipeline(base), ctx)
            t1 = time.perf_counter()
            model_attacks.get(name)(steps=11, **kw).apply(copy_pipeline(base), ctx)
            t2 = time.perf_counter()
            print(f"{name} {kw}: {(t2 - t1 - (t1 - t0)) / 10:.3f} s per step (setup {t1 - t0:.1f} s)")
        t0 = time.perf_counter()
        print(evaluate(base, "tiny:style"), f"{time.perf_counter() - t0:.1f} s per evaluation")
        return
    # the clean base: step 0 of every task
    for dataset in ("tiny:style", "tiny:subject"):
        key = f"base({dataset})"
        if not any(r["setting"] == key for r in data["rows"]):
            data["rows"].append({"setting": key, "attack": "none", "params": {"dataset": dataset}, "steps": 0,
                                 "seed": 0, "train_s": 0.0, **evaluate(base, dataset)})
            save(path, data)
            print(key, data["rows"][-1]["recognition"], flush=True)
    only = set(args.only.split(",")) if args.only else None
    order = [int(i) for i in args.index.split(",")] if args.index else range(len(SETTINGS))
    for i in order:  # in the order given
        attack_name, params, ckpts = SETTINGS[i]
        if only and attack_name not in only:
            continue
        run_setting(attack_name, params, ckpts, base, evaluate, data, path, args.seed)


if __name__ == "__main__":
    main()
