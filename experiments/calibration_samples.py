"""What the style fine-tunes draw (issue 24): a row of images per model for the first held-out style captions, with
the recogniser's per-row rates (striped and content kept; content alone; the raw striped question of v1).

    python -m experiments.calibration_samples [--out docs/img/calibration_samples.png] [--n 8]

Rows: real style images, the clean base, LoRA (rank 20) at lr 3e-3 and at 1e-2 after 200 steps (seed 0, the
attack's own ``apply``), generated exactly as the ``attacker_utility`` metric generates them.
"""
import argparse

import numpy as np
import torch
from PIL import Image
ap = argparse.ArgumentParser()
ap.add_argument("--out", default="docs/img/calibration_samples.png")
ap.add_argument("--n", type=int, default=8)
args = ap.parse_args()
torch.set_num_threads(2)
from markbench.config import load_config
from markbench.models import load_pipeline
from markbench import model_attacks
from markbench.plugins import StageContext
from markbench.testing import Resources, copy_pipeline
from markbench.downstream import eval_captions, task_of
from markbench.plan import downstream_request
from markbench.generation import generate_images
from markbench.worlds.tiny.downstream import Recogniser
from markbench.worlds.tiny import shapes
cfg = load_config("configs/finetune.toml", check_output=False)
base = load_pipeline(cfg.model)
task = task_of("tiny:style")
n = args.n
caps = eval_captions(task, n)
req = downstream_request(cfg, 0, caps)
rec = Recogniser.shared()
rows = []
def show(name, imgs):
    s = rec.striped_hits(imgs, caps); c = rec.content_hits(imgs, caps)
    f = rec._image(imgs); w = rec._text(caps); wo = rec._text([x.replace("striped ", "") for x in caps])
    print(name, "striped+content", s.mean(), "content", c.mean(), "striped-raw", ((f*w).sum(1) > (f*wo).sum(1)).float().mean().item())
    rows.append(imgs)
real = torch.from_numpy(shapes.make_dataset("style", n, seed=1)[0]).permute(0,3,1,2).float()/255
show("real", real)
show("base", generate_images(base, req))
for lr, steps in ((3e-3, 200), (1e-2, 200)):
    ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: base, 64, 64))
    pipe = model_attacks.get("lora")(dataset="tiny:style", rank=20, alpha=20.0, lr=lr, steps=steps).apply(copy_pipeline(base), ctx)
    show(f"lora lr={lr} {steps}", generate_images(pipe, req))
grid = torch.cat([torch.cat(list(r), 2) for r in rows], 1)
Image.fromarray((grid.permute(1,2,0).numpy()*255).round().astype(np.uint8)).resize((n*128, len(rows)*128), Image.NEAREST).save(args.out)
print("rows: real, base, lora 3e-3 x 200, lora 1e-2 x 200; captions:", caps)
print("wrote", args.out)
