"""Does fine-tuning really change the tiny-world model? (issue: model-level attacks)

Generates images for the downstream captions before and after each training attack, exactly as the harness's
model-attack stage runs it, and classifies them zero-shot with the tiny CLIP (:mod:`bench.downstream`, the same
recogniser the harness's ``attacker_utility`` metric uses in every model-attacked cell):

* new style (``finetune`` / ``lora`` on ``tiny:style``): captions "a large red striped circle on a grey background";
  score = fraction of images the CLIP calls *striped* rather than *solid* (the caption with vs without the word).
* new subject (``dreambooth`` on ``tiny:subject``): captions "a large red sks on a grey background"; score =
  fraction of images whose most likely shape word, among the 7 base shapes and ``sks``, is ``sks``.

    python benchmarks/downstream.py [--config bench.toml] [--attacks finetune,lora,dreambooth] [--n 32] [--steps 200]
                                    [--lr LR]

Prints one row per attack: the recognition rate before, after, and the attack's seconds.
"""

from __future__ import annotations

import argparse
import time

import torch


def captions(split: str, n: int) -> list[str]:
    """``n`` held-out captions of a downstream split (``style`` or ``subject``), as the harness draws them."""
    from markbench.downstream import eval_captions, task_of

    return eval_captions(task_of(f"tiny:{split}"), n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench.toml")
    ap.add_argument("--attacks", default="finetune,lora,dreambooth")
    ap.add_argument("--n", type=int, default=32, help="images per measurement")
    ap.add_argument("--steps", type=int, default=200, help="training steps of every attack")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of every attack (default: each attack's)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from markbench import model_attacks
    from markbench.config import load_config
    from markbench.worlds.tiny.downstream import Recogniser
    from markbench.generation import generate_images
    from markbench.models import load_pipeline
    from markbench.plugins import GenerationRequest, StageContext
    from markbench.testing import Resources, copy_pipeline
    from markbench.worlds.tiny import shapes

    cfg = load_config(args.config, check_output=False)
    base = load_pipeline(cfg.model)
    rec = Recogniser()  # the same recogniser as the harness's attacker_utility metric
    token = shapes.SUBJECT_TOKEN

    def request(captions):
        return GenerationRequest(prompts=tuple(captions), seeds=tuple(range(len(captions))), height=cfg.model.height,
                                 width=cfg.model.width, num_inference_steps=cfg.model.num_inference_steps,
                                 guidance_scale=cfg.model.guidance_scale, batch_size=16)

    style, subject = captions("style", args.n), captions("subject", args.n)
    # the ceiling: the CLIP's reading of the real downstream images those captions describe
    real = {k: (shapes.to_tensor(shapes.make_dataset(k, args.n, seed=1)[0]) + 1) / 2 for k in ("style", "subject")}
    print(f"real downstream images recognised: style {rec.striped(real['style'], style):.3f}, "
          f"subject {rec.subject(real['subject'], subject, token):.3f}")

    def score(pipe, kind):
        if kind == "style":
            return rec.striped(generate_images(pipe, request(style)), style)
        return rec.subject(generate_images(pipe, request(subject)), subject, token)

    print(f"model: {cfg.model.source}; {args.n} images per measurement; torch threads {torch.get_num_threads()}")
    params = {"finetune": {"dataset": "tiny:style"}, "lora": {"dataset": "tiny:style"},
              "dreambooth": {"dataset": "tiny:subject", "token": token}}
    before = {}
    for name in args.attacks.split(","):
        kind = "subject" if name == "dreambooth" else "style"
        if kind not in before:
            before[kind] = score(base, kind)
        extra = {"lr": args.lr} if args.lr is not None else {}
        attack = model_attacks.get(name)(steps=args.steps, **params.get(name, {}), **extra)
        ctx = StageContext(torch.Generator().manual_seed(0),
                           data=Resources(lambda: base, cfg.model.height, cfg.model.width))
        t0 = time.perf_counter()
        pipe = attack.apply(copy_pipeline(base), ctx)
        dt = time.perf_counter() - t0
        after = score(pipe, kind)
        print(f"{attack.describe():60s} {kind:7s} recognised before {before[kind]:.3f} -> after {after:.3f} "
              f"({dt:.0f} s to train)")


if __name__ == "__main__":
    main()
