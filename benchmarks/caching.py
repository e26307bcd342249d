"""Caching: a finished grid re-runs with no model work; one added attack recomputes only its own stages.

    python benchmarks/caching.py [--config bench.toml] [--images 8]

Prints the stage counts of three runs of the same output folder: the first (empty cache), the re-run, and the run
with one more image attack in the grid.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench.toml")
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()

    from bench.config import load_config
    from bench.runner import Runner

    tmp = Path(tempfile.mkdtemp(prefix="markbench-caching-"))
    over = {"run.num_images": args.images, "run.output": str(tmp)}

    def run(path, label):
        cfg = load_config(path, over)
        t0 = time.perf_counter()
        s = Runner(cfg).run()
        dt = time.perf_counter() - t0
        stages = ", ".join(f"{k} {v}" for k, v in sorted(s.stages_run.items())) or "none"
        print(f"{label:28s} cells computed {s.cells_ok:3d}, skipped {s.cells_skipped:3d}; "
              f"stages run: {stages}; {dt:.1f} s")
        return s

    run(args.config, "1. empty cache")
    again = run(args.config, "2. same grid again")
    extra = tmp / "plus_one.toml"
    extra.write_text(Path(args.config).read_text() + '\n[[image_attacks]]\nname = "median_filter"\nkernel_size = 5\n')
    added = run(extra, "3. plus median_filter(5)")
    ok = not again.stages_run and set(added.stages_run) <= {"image_attack", "detect"}
    print(f"re-run did no model work and the added attack ran only its own stages: {'PASS' if ok else 'FAIL'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
