"""The removal-attack matrix of docs/attacks.md, generated from a run's results database.

    python experiments/attacks_matrix.py RUN/results.sqlite > /tmp/matrix.md

One row per (defence, image attack) cell that finished: bit accuracy and TPR at FPR 1e-2 with their 95% intervals
(Clopper-Pearson / as stored), AUC, PSNR and SSIM of the attacked images to the attack's input, and the CLIP score of
the attacked images with its change relative to the input's (``clip_score / clip_score_watermark - 1``). Cells that
did not finish are listed by label.
"""

from __future__ import annotations

import sqlite3
import sys


def _ci(r) -> str:
    if r is None:
        return "-"
    value, low, high = r
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def main(path: str) -> None:
    db = sqlite3.connect(path)
    cells = db.execute("select cell_id, defense_label, image_attack_label, status, n_images from cells "
                       "order by rowid").fetchall()
    print("| defence | image attack | N | bit accuracy [95% CI] | TPR@1e-2 [95% CI] | AUC | PSNR to input (dB) | "
          "SSIM to input | CLIP score | CLIP change |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    missing = []
    for cell_id, defense, attack, status, n in cells:
        if status != "ok":
            missing.append(f"{defense}/{attack} ({status})")
            continue
        rows = {m: (v, lo, hi) for m, v, lo, hi in db.execute(
            "select metric, value, low, high from results where cell_id = ?", (cell_id,))}
        psnr = rows.get("psnr_attack")
        ssim = rows.get("ssim_attack")
        clip, clip_in = rows.get("clip_score"), rows.get("clip_score_watermark")
        change = f"{100 * (clip[0] / clip_in[0] - 1):+.1f} %" if clip and clip_in and clip_in[0] else "-"
        print(f"| {defense} | {attack} | {n} | {_ci(rows.get('bit_accuracy'))} | {_ci(rows.get('tpr@0.01'))} | "
              f"{_ci(rows.get('auc'))} | {psnr[0]:.1f} | {ssim[0]:.3f} | {_ci(clip)} | {change} |"
              if psnr and ssim else
              f"| {defense} | {attack} | {n} | {_ci(rows.get('bit_accuracy'))} | {_ci(rows.get('tpr@0.01'))} | "
              f"{_ci(rows.get('auc'))} | - | - | {_ci(clip)} | {change} |")
    if missing:
        print("\nNot finished: " + ", ".join(missing))


if __name__ == "__main__":
    main(sys.argv[1])
