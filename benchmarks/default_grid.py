"""The shipped grid end to end: time with an empty cache, time with everything cached, and peak memory.

Targets (tiny-world issue, 2-core CPU, shipped models present): empty cache <= 10 minutes; everything cached (the
same command again) <= 30 seconds; peak memory <= 4 GB. Also shown, without a target: a new output folder on the
first run's cache (no stage recomputed, but every cell's metrics measured again). Each run is a fresh ``bench run`` process (as a user would type it); its peak
resident memory is read from the kernel (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of that child alone).

    python benchmarks/default_grid.py [--config bench.toml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

TARGETS = {"empty cache": 600.0, "cached": 30.0, "re-measure": None}
MEMORY_TARGET_GB = 4.0


def run_once(config: str, output: str, *extra: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one ``bench run`` in a child process."""
    argv = ["run", "--config", config, "--output", output, "--no-progress", *extra]
    code = f"import sys; from markbench.cli import main; sys.exit(main({argv!r}))"
    t0 = time.perf_counter()
    # a grandchild measures the child alone: RUSAGE_CHILDREN of this wrapper covers only its own child
    wrapper = ("import resource, subprocess, sys; "
               f"rc = subprocess.call([sys.executable, '-c', {code!r}], stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"bench run failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return dt, int(out.stdout.strip().splitlines()[-1]) / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench.toml")
    ap.add_argument("--keep", default=None, help="write the first run here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="markbench-grid-")
    try:
        first = args.keep or os.path.join(tmp, "first")
        if args.keep and os.path.exists(first):
            raise SystemExit(f"--keep {first}: the folder exists; the first run needs an empty cache")
        rows = [("empty cache", *run_once(args.config, first))]
        # the same command again: every stage and every cell's results are cached
        rows.append(("cached", *run_once(args.config, first)))
        # a new output folder on the first run's cache: no stage is recomputed, but every cell is measured again
        rows.append(("re-measure", *run_once(args.config, os.path.join(tmp, "second"), "--set",
                                             f"run.cache={os.path.join(first, 'cache')}")))
        print(f"config {args.config}; {os.cpu_count()} CPUs")
        for label, dt, gb in rows:
            t = TARGETS[label]
            verdict = (f"target <= {t:.0f} s: ratio {dt / t:.2f}, {'PASS' if dt <= t else 'FAIL'}" if t
                       else "no target: metrics (FID's Inception features) computed again")
            print(f"{label:12s} {dt:7.1f} s ({verdict}); peak memory {gb:.2f} GB "
                  f"(target <= {MEMORY_TARGET_GB:.0f} GB: {'PASS' if gb <= MEMORY_TARGET_GB else 'FAIL'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
