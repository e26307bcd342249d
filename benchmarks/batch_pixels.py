"""Do generated pixels depend on the batch an image is sampled in? (issue 26, section 4; docs/reliability.md)

Samples the first N images of a config's generation request (same prompts, same per-image seeds) at the reference
batch size and at others, and prints, per batch size, how many images and 8-bit values differ from the reference.
If any differ, ``run.batch_size`` must be (and is) part of the generate stage's cache key.

    python benchmarks/batch_pixels.py                         # bench.toml (tiny-sd), 16 images, batch 16 vs 1 and 3
    python benchmarks/batch_pixels.py --images 8 --batches 8 1 3 --threads 1
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench.toml")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 1, 3], help="the first is the reference")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from markbench.cache import to_uint8
    from markbench.config import load_config
    from markbench.generation import generate_images
    from markbench.models import load_pipeline
    from markbench.plan import generation_request

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, {"run.num_images": args.images}, check_output=False)
    pipe = load_pipeline(cfg.model)
    request = generation_request(cfg, cfg.run.seeds[0])
    ref = None
    for bs in args.batches:
        t0 = time.perf_counter()
        images = to_uint8(generate_images(pipe, replace(request, batch_size=bs)))
        seconds = time.perf_counter() - t0
        if ref is None:
            ref, ref_bs = images, bs
            print(f"batch {bs:3d}: {seconds:6.1f} s (reference)", flush=True)
            continue
        diff = (images.int() - ref.int()).abs()
        n_img = int((diff.flatten(1) > 0).any(1).sum())
        print(f"batch {bs:3d}: {seconds:6.1f} s; vs batch {ref_bs}: {n_img}/{len(images)} images differ, "
              f"{int((diff > 0).sum())} of {diff.numel()} 8-bit values differ, max difference {int(diff.max())} "
              "grey level(s)", flush=True)


if __name__ == "__main__":
    main()
