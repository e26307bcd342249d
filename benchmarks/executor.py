"""The same grid in-process and on a local Ray (``--executor ray``), on this machine: wall time, the ratio, and where
the time goes; the two runs' numbers are compared cell by cell.

Each run gets its own empty cache, so both compute every stage. Ray is started with ``--cpus`` CPUs (its start is
timed apart from the run), its home and temporary folders inside a temporary folder, and is shut down at the end.
Target (issue 30): Ray's wall time at most 1.3x the in-process run's on 2 cores for a tiny grid.

    python benchmarks/executor.py                                   # dwtdct x the shipped attacks, 8 images per cell
    python benchmarks/executor.py --only '*' --set run.num_images=32  # the shipped grid as shipped
    python benchmarks/executor.py --config configs/x.toml --only 'dwtdct/*'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rows(output: Path) -> dict:
    con = sqlite3.connect(output / "results.sqlite")
    rows = {(c, m): rest for c, m, *rest in con.execute("select cell, metric, value, low, high, n from results_full")}
    con.close()
    return rows


def _stage_seconds(cache: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in cache.glob("*/*/meta.json"):
        m = json.loads(p.read_text())
        out[m["kind"]] = out.get(m["kind"], 0.0) + m.get("seconds", 0.0)
    return out


def _measure_seconds(output: Path) -> float:
    con = sqlite3.connect(output / "results.sqlite")
    total = sum(json.loads(t or "{}").get("measure", 0.0) for (t,) in con.execute("select timings_json from cells"))
    con.close()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "bench.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", default="dwtdct/*", help="cells to run (default: one defence x the shipped image "
                    "attacks, 10 cells; '*' for the whole grid)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = ap.parse_args()

    import ray

    from markbench.config import load_config, parse_override
    from markbench.runner import Runner

    overrides = {"run.num_images": 8, "run.batch_size": 8} | dict(parse_override(o) for o in args.overrides)
    tmp = Path(tempfile.mkdtemp(prefix="mb-exec-", dir="/tmp"))
    os.environ["HOME"] = str(tmp / "home")
    os.environ["RAY_TMPDIR"] = str(tmp)
    (tmp / "home").mkdir()
    (tmp / "ray").mkdir()
    try:
        walls, outs = {}, {}
        for executor in ("local", "ray"):
            out = tmp / executor
            cfg = load_config(args.config, overrides | {"run.output": str(out), "run.cache": "",
                                                        "run.executor": executor})
            if executor == "ray":
                t0 = time.perf_counter()
                ray.init(num_cpus=args.cpus, _temp_dir=str(tmp / "r"), include_dashboard=False,
                         log_to_driver=False)
                walls["ray start"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            summary = Runner(cfg).run(only=args.only)
            walls[executor] = time.perf_counter() - t0
            outs[executor] = cfg
            print(f"{executor:5s}: {summary.cells_ok} cells ok, {len(summary.cells_failed)} failed, "
                  f"stages run {dict(sorted(summary.stages_run.items()))}, wall {walls[executor]:.1f} s", flush=True)
        ray.shutdown()
        local_rows, ray_rows = _rows(outs["local"].output), _rows(outs["ray"].output)
        same = local_rows == ray_rows
        print(f"\nnumbers equal cell by cell: {same} ({len(ray_rows)} results)")
        for key in [k for k in sorted(local_rows) if local_rows[k] != ray_rows.get(k)][:10]:
            print(f"  differs: {key[0]} {key[1]}: in-process {local_rows[key]}, ray {ray_rows.get(key)}")
        print("\nwhere the time goes (seconds; stage sums are compute time inside stages, summed over workers):")
        kinds = sorted(set(_stage_seconds(outs["local"].cache_dir)) | set(_stage_seconds(outs["ray"].cache_dir)))
        print(f"  {'':22s} {'in-process':>10s} {'ray':>10s}")
        sl, sr = _stage_seconds(outs["local"].cache_dir), _stage_seconds(outs["ray"].cache_dir)
        for k in kinds:
            print(f"  stage {k:16s} {sl.get(k, 0):10.1f} {sr.get(k, 0):10.1f}")
        ml, mr = _measure_seconds(outs["local"].output), _measure_seconds(outs["ray"].output)
        print(f"  {'measure (driver)':22s} {ml:10.1f} {mr:10.1f}")
        print(f"  {'stages + measure':22s} {sum(sl.values()) + ml:10.1f} {sum(sr.values()) + mr:10.1f}")
        print(f"  {'run wall':22s} {walls['local']:10.1f} {walls['ray']:10.1f}")
        print(f"  {'ray start (apart)':22s} {'':10s} {walls['ray start']:10.1f}")
        ratio = walls["ray"] / walls["local"]
        ratio_start = (walls["ray"] + walls["ray start"]) / walls["local"]
        print(f"\nratio ray / in-process wall: {ratio:.2f} (with Ray's start: {ratio_start:.2f}); target <= 1.3 "
              f"on {args.cpus} CPUs")
        return 0 if same else 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
