"""Markdown tables of a sampling-time run (Tree-Ring / Gaussian Shading), for docs/tree_ring.md and
docs/gaussian_shading.md: one row per (model attack, image attack), value [95% interval] and N per metric, and a
dagger where the cell lies outside the defence's threat model.

    python experiments/sampling_time_tables.py runs/sampling-time-tiny/results.sqlite
"""

from __future__ import annotations

import argparse
import json
import math

from markbench.store import ResultStore

METRICS = {"tree_ring": ["auc", "tpr@0.01", "fpr@0.01", "clip_score_watermark_delta", "fid"],
           "gaussian_shading": ["bit_accuracy", "auc", "tpr@1e-06", "fpr@1e-06", "clip_score_watermark_delta", "fid"]}


def fmt(v, lo, hi) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
        s += f" [{lo:.2f}, {hi:.2f}]"
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db")
    args = ap.parse_args(argv)
    store = ResultStore(args.db)
    df = store.dataframe()
    store.close()
    df = df[df.status == "ok"]
    for defense, metrics in METRICS.items():
        sub = df[df.defense == defense]
        if sub.empty:
            continue
        print(f"{defense} ({sub.defense_label.iloc[0]}):\n")
        print("| model attack | image attack | N (marked; as many negatives) | " + " | ".join(metrics) + " |")
        print("| --- | --- | --- | " + " | ".join("---" for _ in metrics) + " |")
        for (ma, ia), cell in sub.groupby(["model_attack_label", "image_attack_label"], sort=False):
            by = {r.metric: r for r in cell.itertuples()}
            outside = json.loads(cell.threat_json.iloc[0] or "{}").get("outside", False)
            n = next((int(r.n) for r in cell.itertuples() if r.metric.startswith("tpr@")), 0)  # images per side
            vals = [fmt(by[m].value, by[m].low, by[m].high) if m in by else "-" for m in metrics]
            mark = " \u2020" if outside else ""
            print(f"| {ma}{mark} | {ia} | {n} | " + " | ".join(vals) + " |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
