"""Generation shared across cells (``run.batch_across_cells``, issue 30) against one generation per cell.

A grid whose cells sample one model with the same settings but their own prompt lists (here: several run seeds,
each with its own prompts and per-image seeds) is run twice from an empty cache in fresh ``bench run`` processes:
once with each cell's generation alone (the default: each stage samples its N images in batches of at most
``batch_size``), once with ``batch_across_cells = true`` (every batch exactly ``batch_size``, filled with the images
of every such cell). It prints both wall times and their ratio. The two runs do not store the same images (the
shared batches are full, the lone ones short, and the pixels depend on the batch size), which is why the option
gives the generate stages keys of their own; with the option on, sharing or not sharing gives the same images
(tests/test_generation_groups.py).

    python benchmarks/batch_across_cells.py                          # tiny-sd, 4 seeds x 8 images, batch 32
    python benchmarks/batch_across_cells.py --seeds 8 --images 4 --batch 32

On a GPU the gain is the point (a batch of 32 keeps it busy where 8 does not); on a CPU a larger batch buys little,
so expect a ratio near 1 there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = """
metrics = ["bit_accuracy"]

[run]
name = "batch-across-cells"
output = "{output}"
seeds = {seeds}
num_images = {images}
batch_size = {batch}
batch_across_cells = {merged}
target_fprs = [1e-6]
primary_metric = "bit_accuracy"

[model]
builtin = "{model}"
num_inference_steps = {steps}

[prompts]
set = "tiny:heldout"

[[defenses]]
name = "none"

[[image_attacks]]
name = "none"
"""


def run(folder: Path, merged: bool, args) -> float:
    """One ``bench run`` from an empty cache (a fresh folder each time), its wall time."""
    folder = folder / f"{'merged' if merged else 'alone'}-{len(list(folder.iterdir()))}"
    folder.mkdir()
    cfg = folder / "grid.toml"
    cfg.write_text(GRID.format(output=folder / "out", seeds=list(range(args.seeds)),
                               images=args.images, batch=args.batch, merged=str(merged).lower(), model=args.model,
                               steps=args.steps))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "markbench.cli", "run", "--config", str(cfg), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--seeds", type=int, default=4, help="run seeds: cells that sample the model with their own prompts")
    ap.add_argument("--images", type=int, default=8, help="images per cell")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each (alone, shared, alone, ...); "
                    "the best of each is reported, so a load change on a shared machine hits both")
    args = ap.parse_args()
    walls: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for merged in (False, True):
                walls[merged].append(run(Path(tmp), merged, args))
    alone, merged = min(walls[False]), min(walls[True])
    print(f"{args.seeds} cells x {args.images} images, batch {args.batch}, {args.steps} steps on {args.model}:")
    print(f"  one generation per cell: {alone:.1f} s (runs {', '.join(f'{w:.1f}' for w in walls[False])}); "
          f"shared batches: {merged:.1f} s (runs {', '.join(f'{w:.1f}' for w in walls[True])}); "
          f"ratio {alone / merged:.2f}x")


if __name__ == "__main__":
    main()
