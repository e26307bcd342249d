"""Caching: a finished grid re-runs with no model work; one added attack recomputes only its own stages; a grid
re-measured into a new output folder on the same cache reads its FID / CLIP features instead of extracting them.

    python benchmarks/caching.py [--config bench.toml] [--images 8] [--repeats 1]
    python benchmarks/caching.py --remeasure-only --cache DIR --images 32   # on a cache a grid run already filled

Prints the stage counts of three runs of the same output folder: the first (empty cache), the re-run, and the run
with one more image attack in the grid. Then the same grid is measured again into fresh output folders on the same
cache (every stage cached, so only measuring runs), alternately with the feature cache turned off (Inception and
CLIP's image tower run again, as before features were stored) and on, ``--repeats`` times each; prints both wall
times, the ratio, and whether every number is the same.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

# the repository first: run as a script, this folder is sys.path[0], and its attacks.py would shadow the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench.toml")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="re-measuring runs with and without stored features")
    ap.add_argument("--cache", default=None, help="artifact cache to use (default: a fresh temporary one)")
    ap.add_argument("--remeasure-only", action="store_true",
                    help="only the re-measuring runs, on --cache (which a run of the same grid filled)")
    args = ap.parse_args()

    from markbench.config import load_config
    from markbench.runner import Runner

    tmp = Path(tempfile.mkdtemp(prefix="markbench-caching-"))
    cache = Path(args.cache) if args.cache else tmp / "cache"
    over = {"run.num_images": args.images, "run.output": str(tmp), "run.cache": str(cache)}

    def run(path, label, output=None, features=True):
        cfg = load_config(path, over | ({"run.output": str(output)} if output else {}))
        runner = Runner(cfg)
        if not features:
            runner.features = None  # metrics extract every set's features again (the behaviour before the cache)
        t0 = time.perf_counter()
        s = runner.run()
        dt = time.perf_counter() - t0
        stages = ", ".join(f"{k} {v}" for k, v in sorted(s.stages_run.items())) or "none"
        extra = (f"; features read {runner.features.reads}, stored {runner.features.writes}"
                 if runner.features is not None else "")
        print(f"{label:36s} cells computed {s.cells_ok:3d}, skipped {s.cells_skipped:3d}; "
              f"stages run: {stages}{extra}; {dt:.1f} s", flush=True)
        s.seconds = dt
        return s

    if not args.remeasure_only:
        run(args.config, "1. empty cache")
        again = run(args.config, "2. same grid again")
        extra = tmp / "plus_one.toml"
        extra.write_text(Path(args.config).read_text()
                         + '\n[[image_attacks]]\nname = "median_filter"\nkernel_size = 5\n')
        added = run(extra, "3. plus median_filter(5)")
        ok = not again.stages_run and set(added.stages_run) <= {"image_attack", "detect"}
        print(f"re-run did no model work and the added attack ran only its own stages: {'PASS' if ok else 'FAIL'}")

    # re-measuring: every stage is cached; only the metrics run, with and without stored features
    times: dict[bool, list[float]] = {False: [], True: []}
    values: dict[bool, dict] = {}
    for r in range(args.repeats):
        for features in (False, True):
            out = tmp / f"remeasure-{'cached' if features else 'recomputed'}-{r}"
            label = f"{4 + 2 * r + features}. new folder, {'features cached' if features else 'features recomputed'}"
            s = run(args.config, label, out, features)
            times[features].append(s.seconds)
            values[features] = _values(out)
    same = values[False] == values[True]
    if not args.remeasure_only:
        same = same and values[True] == {k: v for k, v in _values(tmp).items() if k in values[True]}
    best_off, best_on = min(times[False]), min(times[True])
    print(f"re-measured grid: features recomputed {best_off:.1f} s, read from the cache {best_on:.1f} s (best of "
          f"{args.repeats}): {best_off / best_on:.2f}x faster; every number equal: {'PASS' if same else 'FAIL'}")
    shutil.rmtree(tmp, ignore_errors=True)


def _values(output: Path) -> dict:
    from markbench.store import ResultStore

    store = ResultStore(output / "results.sqlite")
    try:
        df = store.dataframe()
    finally:
        store.close()
    df = df[df.status == "ok"]
    return {(r.cell, r.metric): (r.value, r.low, r.high) for r in df.itertuples()}


if __name__ == "__main__":
    main()
