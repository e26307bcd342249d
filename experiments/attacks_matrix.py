"""The attack matrices of docs/attacks.md, generated from a run's results database.

    python experiments/attacks_matrix.py RUN/results.sqlite > /tmp/matrix.md

Three tables:

* **Removal**: one row per (defence, image attack) removal cell that finished: bit accuracy and TPR at FPR 1e-2 with
  their 95% intervals (Clopper-Pearson / as stored), AUC, PSNR and SSIM of the attacked images to the attack's input,
  and the CLIP score of the attacked images with its change relative to the input's
  (``clip_score / clip_score_watermark - 1``).
* **Joint success and cost** (where the run has the ``joint_evasion`` metric): per removal cell the fraction of images
  that evade detection at FPR 1e-2 within the quality bound with their content kept (Clopper-Pearson), the quality
  bound and content judge alone, and the attack's cost (CPU seconds per image of its stage, model evaluations, images
  the attacker needed, as recorded by the attack).
* **Forgery** (forgery cells): the forged clean images' FPR at the defence's threshold for 1e-2 and 1e-6 beside the
  clean images' (Clopper-Pearson), the joint forgery rate, PSNR / SSIM of the forged images to the clean input, and
  the cost.

Cells that did not finish are listed by label; of two cells under one label (a re-run with other settings), the
later one is shown.
"""

from __future__ import annotations

import json
import sqlite3
import sys


def _ci(r) -> str:
    if r is None:
        return "-"
    value, low, high = r
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _cost(costs_json: str | None) -> str:
    costs = json.loads(costs_json or "{}")
    c = costs.get("forge") or costs.get("image_attack") or {}
    parts = []
    if c.get("seconds") is not None and c.get("images"):
        parts.append(f"{1000 * c['seconds'] / c['images']:.1f} ms/img")
    if c.get("model_evals") is not None:
        parts.append(f"{c['model_evals']} evals")
    if c.get("attacker_images") is not None:
        parts.append(f"{c['attacker_images']} attacker img")
    s = costs.get("surrogate")
    if s:
        parts.append(f"surrogate: {s.get('attacker_images')} img, {s.get('seconds', 0):.0f} s, train acc "
                     f"{s.get('train_accuracy', float('nan')):.2f}")
    return ", ".join(parts) or "-"


def _label(metric: str, rows: dict) -> str | None:
    """The stored name of a ``@0.01``-style metric (``tpr@0.01``; a score defence's ``tpr@fpr<=k/N``)."""
    for name in rows:
        if name.startswith(metric + "@") and (name.endswith("@0.01") or "fpr<=" in name):
            return name
    return None


def main(path: str) -> None:
    db = sqlite3.connect(path)
    columns = {r[1] for r in db.execute("PRAGMA table_info(cells)")}
    axis = "axis" if "axis" in columns else "'removal'"
    rows = db.execute(f"select cell_id, defense_label, image_attack_label, status, n_images, costs_json, "
                      f"coalesce({axis}, 'removal'), model_attack_label, seed from cells order by rowid").fetchall()
    # a cell re-run with other settings under the same label replaces the earlier one (the reports do the same)
    latest: dict[tuple, tuple] = {}
    for r in sorted(rows, key=lambda r: db.execute("select updated from cells where cell_id = ?",
                                                   (r[0],)).fetchone()[0]):
        latest[(r[1], r[7], r[2], r[8])] = r[:7]
    order = list(dict.fromkeys((r[1], r[7], r[2], r[8]) for r in rows))
    cells = [latest[k] for k in order]
    results = {cell_id: {m: (v, lo, hi) for m, v, lo, hi in db.execute(
        "select metric, value, low, high from results where cell_id = ?", (cell_id,))} for cell_id, *_ in cells}
    missing = [f"{d}/{a} ({s})" for _, d, a, s, *_ in cells if s != "ok"]
    done = [c for c in cells if c[3] == "ok"]

    print("#### Removal\n")
    print("| defence | image attack | N | bit accuracy [95% CI] | TPR@1e-2 [95% CI] | AUC | PSNR to input (dB) | "
          "SSIM to input | CLIP score | CLIP change |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cell_id, defense, attack, _, n, _, ax in done:
        if ax == "forgery":
            continue
        rows = results[cell_id]
        psnr, ssim = rows.get("psnr_attack"), rows.get("ssim_attack")
        clip, clip_in = rows.get("clip_score"), rows.get("clip_score_watermark")
        change = f"{100 * (clip[0] / clip_in[0] - 1):+.1f} %" if clip and clip_in and clip_in[0] else "-"
        quality = f"{psnr[0]:.1f} | {ssim[0]:.3f}" if psnr and ssim else "- | -"
        print(f"| {defense} | {attack} | {n} | {_ci(rows.get('bit_accuracy'))} | {_ci(rows.get('tpr@0.01'))} | "
              f"{_ci(rows.get('auc'))} | {quality} | {_ci(clip)} | {change} |")

    joint = [c for c in done if c[6] != "forgery" and c[2] != "none" and _label("joint_evasion", results[c[0]])]
    if joint:
        print("\n#### Joint success and cost (removal)\n")
        print("| defence | image attack | joint evasion@1e-2 [95% CI] | quality kept | content kept | cost |")
        print("| --- | --- | --- | --- | --- | --- |")
        for cell_id, defense, attack, _, _, costs, _ in joint:
            rows = results[cell_id]
            print(f"| {defense} | {attack} | {_ci(rows.get(_label('joint_evasion', rows)))} | "
                  f"{_ci(rows.get('quality_kept'))} | {_ci(rows.get('content_kept'))} | {_cost(costs)} |")

    forged = [c for c in done if c[6] == "forgery"]
    if forged:
        print("\n#### Forgery (clean images made to read as marked)\n")
        print("| defence | forgery | N | forged FPR@1e-2 [95% CI] | clean FPR@1e-2 | forged FPR@1e-6 [95% CI] | "
              "joint forgery@1e-2 | PSNR to clean input (dB) | SSIM | cost |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for cell_id, defense, attack, _, n, costs, _ in forged:
            rows = results[cell_id]
            f2 = _label("forged_fpr", rows)
            c2 = _label("clean_fpr", rows)
            psnr, ssim = rows.get("psnr_attack"), rows.get("ssim_attack")
            quality = f"{psnr[0]:.1f} | {ssim[0]:.3f}" if psnr and ssim else "- | -"
            print(f"| {defense} | {attack} | {n} | {_ci(rows.get(f2) if f2 else None)} | "
                  f"{_ci(rows.get(c2) if c2 else None)} | {_ci(rows.get('forged_fpr@1e-06'))} | "
                  f"{_ci(rows.get(_label('joint_forgery', rows)))} | {quality} | {_cost(costs)} |")
    if missing:
        print("\nNot finished: " + ", ".join(missing))


if __name__ == "__main__":
    main(sys.argv[1])
