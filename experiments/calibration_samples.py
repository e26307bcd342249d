"""What the downstream fine-tunes draw (issue 24): a row of images per model for the first held-out captions of a
task, with the recogniser's per-row rates (recognised: the style or subject AND the caption's content; content
alone).

    python -m experiments.calibration_samples [--task style|subject] [--out docs/img/calibration_samples.png] [--n 8]

``style`` (the figure of recogniser v2's reading): real style images, the clean base, LoRA (rank 20) at lr 3e-3 and
at 1e-2 after 200 steps. ``subject`` (the calibrated settings of configs/finetune.toml, v3): real subject images,
the clean base, full fine-tuning at lr 1e-4 and LoRA (rank 20) at lr 1e-3, each after 200 steps. Each model
is the attack's own ``apply`` (seed 0), its images generated exactly as the ``attacker_utility`` metric generates
them.
"""
import argparse

import numpy as np
import torch
from PIL import Image

ROWS = {
    "style": [("lora", {"rank": 20, "alpha": 20.0, "lr": 3e-3, "steps": 200}),
              ("lora", {"rank": 20, "alpha": 20.0, "lr": 1e-2, "steps": 200})],
    "subject": [("finetune", {"lr": 1e-4, "steps": 200}),
                ("lora", {"rank": 20, "alpha": 20.0, "lr": 1e-3, "steps": 200})],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(ROWS), default="style")
    ap.add_argument("--out", default=None, help="default: docs/img/calibration_samples[_subject].png")
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from markbench import model_attacks
    from markbench.config import load_config
    from markbench.downstream import eval_captions, task_of
    from markbench.generation import generate_images
    from markbench.models import load_pipeline
    from markbench.plan import downstream_request
    from markbench.plugins import StageContext
    from markbench.testing import Resources, copy_pipeline
    from markbench.worlds.tiny import shapes
    from markbench.worlds.tiny.downstream import Recogniser

    out = args.out or ("docs/img/calibration_samples.png" if args.task == "style"
                       else f"docs/img/calibration_samples_{args.task}.png")
    dataset = f"tiny:{args.task}"
    cfg = load_config("configs/finetune.toml", check_output=False)
    base = load_pipeline(cfg.model)
    task = task_of(dataset)
    n = args.n
    caps = eval_captions(task, n)
    req = downstream_request(cfg, 0, caps)
    rec = Recogniser.shared()
    rows = []

    def show(name, imgs):
        hits = rec.hits(task, imgs, caps)
        content = rec.content_hits(imgs, caps, shape=task.kind == "style")
        print(f"{name}: recognised {hits.mean():.3f}, content {content.mean():.3f}", flush=True)
        rows.append(imgs)

    real = torch.from_numpy(shapes.make_dataset(args.task, n, seed=1)[0]).permute(0, 3, 1, 2).float() / 255
    show("real", real)
    show("base", generate_images(base, req))
    for name, kw in ROWS[args.task]:
        ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: base, 64, 64))
        pipe = model_attacks.get(name)(dataset=dataset, **kw).apply(copy_pipeline(base), ctx)
        show(f"{name} {kw}", generate_images(pipe, req))
    grid = torch.cat([torch.cat(list(r), 2) for r in rows], 1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
        (n * 128, len(rows) * 128), Image.NEAREST).save(out)
    print("rows: real, base,", ", ".join(f"{a} {k}" for a, k in ROWS[args.task]), "; captions:", caps)
    print("wrote", out)


if __name__ == "__main__":
    main()
