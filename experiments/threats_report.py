"""docs/threats.md, generated from a run of configs/sleepermark-threats.toml (its results database).

    python experiments/threats_report.py RUN/results.sqlite > docs/threats.md

For each trigger defence (the rows with the trigger: the mark) and model attack: the attack's threat tier, TPR at FPR
1e-6 and bit accuracy with their 95% intervals (as stored: Clopper-Pearson / bootstrap), the evasion rate (1 - TPR,
interval [1 - high, 1 - low]), the attacked model's quality on ordinary prompts (its ``[no_trigger]`` row: FID and
CLIP score of its trigger-free images against the clean base model's), whether that quality is within the usability
bar, and the joint "evades and stays usable" rate. The bar, stated once here and in the document: the attacked
model's trigger-free FID is at most ``FID_BAR`` times the unattacked watermarked model's, and its CLIP score at least
``CLIP_BAR`` times it. The joint rate is the evasion rate in a usable cell and 0 in an unusable one (usability is read
per cell: the per-image quality of one image is not a usability measure). Cells that did not finish are listed.
"""

from __future__ import annotations

import json
import sqlite3

FID_BAR = 1.25
CLIP_BAR = 0.9
TIER_ORDER = {"": 0, "blind": 1, "method_known": 2, "trigger_known": 3}


def _ci(r, digits: int = 3) -> str:
    if r is None:
        return "-"
    value, low, high = r
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def load(path: str):
    db = sqlite3.connect(path)
    cells = db.execute("select cell_id, defense_label, model_attack_label, status, n_images, costs_json, "
                       "timings_json, threat_json, error from cells order by updated").fetchall()
    out = {}
    for cell_id, defense, attack, status, n, costs, timings, threat, error in cells:
        rows = {m: (v, lo, hi) for m, v, lo, hi in db.execute(
            "select metric, value, low, high from results where cell_id = ?", (cell_id,))}
        out[(defense, attack)] = dict(status=status, n=n, rows=rows, costs=json.loads(costs or "{}"),
                                      timings=json.loads(timings or "{}"), threat=json.loads(threat or "{}"),
                                      error=(error or "").splitlines()[-1:] if error else [])
    return out


def table(cells) -> tuple[list[str], list[str]]:
    lines = ["| defence | model attack | tier | N | TPR@1e-6 [95% CI] | bit accuracy [95% CI] | evasion [95% CI] | "
             "FID, trigger-free | CLIP, trigger-free | usable | evades and usable | attack cost |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missing = []
    marked = sorted({d for d, _ in cells if "[" not in d})
    for defense in marked:
        base_q = cells.get((f"{defense}[no_trigger]", "none"), {}).get("rows", {})
        fid0, clip0 = base_q.get("fid"), base_q.get("clip_score")
        attacks = [a for d, a in cells if d == defense]
        attacks.sort(key=lambda a: TIER_ORDER.get(cells[(defense, a)]["threat"].get("tier", ""), 9))
        for attack in attacks:
            c = cells[(defense, attack)]
            if c["status"] != "ok":
                missing.append(f"{defense}/{attack} ({c['status']}: {' '.join(c['error'])})")
                continue
            rows = c["rows"]
            tpr = rows.get("tpr@1e-06")
            evasion = (1 - tpr[0], 1 - tpr[2], 1 - tpr[1]) if tpr and tpr[1] is not None else None
            q = cells.get((f"{defense}[no_trigger]", attack), {})
            qrows = q.get("rows", {}) if q.get("status") == "ok" else {}
            fid, clip = qrows.get("fid"), qrows.get("clip_score")
            usable = None
            if fid and clip and fid0 and clip0:
                usable = fid[0] <= FID_BAR * fid0[0] and clip[0] >= CLIP_BAR * clip0[0]
            joint = "-" if usable is None or evasion is None else (_ci(evasion) if usable else "0 (not usable)")
            cost = c["costs"].get("model_attack", {})
            secs = c["timings"].get("model_attack")
            cost_txt = ", ".join(x for x in (f"{cost['steps']} steps" if "steps" in cost else "",
                                             f"{secs:.0f} s" if secs else "") if x) or "-"
            tier = c["threat"].get("tier", "") or "(none)"
            lines.append(f"| {defense} | {attack} | {tier} | {c['n']} | {_ci(tpr)} | {_ci(rows.get('bit_accuracy'))} | "
                         f"{_ci(evasion)} | {_ci(fid, 1)} | {_ci(clip, 2)} | "
                         f"{'-' if usable is None else 'yes' if usable else 'no'} | {joint} | {cost_txt} |")
    return lines, missing


def verdicts(cells) -> list[str]:
    """One generated sentence per defence: which attacks break it (TPR@1e-6 below 0.5) and whether the model stays
    usable there, by tier."""
    out = []
    for defense in sorted({d for d, _ in cells if "[" not in d}):
        base_q = cells.get((f"{defense}[no_trigger]", "none"), {}).get("rows", {})
        broken, kept = [], []
        for (d, attack), c in cells.items():
            if d != defense or c["status"] != "ok" or attack == "none":
                continue
            tpr = c["rows"].get("tpr@1e-06")
            if tpr is None:
                continue
            q = cells.get((f"{defense}[no_trigger]", attack), {}).get("rows", {})
            tier = c["threat"].get("tier", "?")
            cost = ""
            if q.get("fid") and q.get("clip_score") and base_q.get("fid") and base_q.get("clip_score"):
                cost = (f"; trigger-free FID {q['fid'][0]:.1f} vs {base_q['fid'][0]:.1f} unattacked, CLIP "
                        f"{q['clip_score'][0]:.2f} vs {base_q['clip_score'][0]:.2f}")
            text = f"`{attack}` ({tier}: TPR@1e-6 {tpr[0]:.2f}{cost})"
            (broken if tpr[0] < 0.5 else kept).append(text)
        out.append(f"* **{defense}**: broken (TPR@1e-6 < 0.5) by " + (", ".join(broken) or "none of the attacks run")
                   + "; kept by " + (", ".join(kept) or "none") + ".")
    return out


def tier_list() -> list[str]:
    """One line per threat tier naming the built-in model attacks declared in it (read from the registry, so the
    list follows the code)."""
    from markbench.plugins import ThreatTier
    from markbench.registries import model_attacks

    by_tier: dict[str, list[str]] = {t.value: [] for t in ThreatTier}
    for name in model_attacks.names():
        cls = model_attacks.get(name)
        if getattr(cls, "identity", False) or model_attacks.origin(name) != "markbench":
            continue
        by_tier[ThreatTier(getattr(cls, "tier", ThreatTier.BLIND)).value].append(f"`{name}`")
    return [f"* `{tier}`: " + (", ".join(sorted(names)) or "none") for tier, names in by_tier.items()]


def main(path: str) -> None:
    cells = load(path)
    lines, missing = table(cells)
    print("# Trigger-activated watermarks under threat tiers\n")
    print("<!-- generated by experiments/threats_report.py from a run of configs/sleepermark-threats.toml; do not "
          "edit by hand -->\n")
    print("What an attacker who knows nothing (`blind`), the method (`method_known`) or the trigger "
          "(`trigger_known`) does to a trigger-activated watermark, and what it costs. A model attack's tier is a "
          "declared class attribute (`bench ls model-attacks -v`); only `trigger_known` attacks are handed the "
          "defence's trigger (`ctx.knowledge.trigger()`), never its key or decoder; every other attack gets a sealed "
          "view that refuses the read (tests/test_threat_tiers.py). The matrix of `bench show` tags a column with "
          "its tier. The model attacks of each tier:\n")
    print("\n".join(tier_list()) + "\n")
    print("`trigger_search` is the method-known tier's search for the trigger (no key, no decoder, no clean base): "
          "a string that changes the model's low-noise output by the same residual whatever the caption; a claimed "
          "one is handed, as the attacker's own knowledge, to `unlearn`, so its column against `unlearn`'s shows "
          "whether tier 1 + search does what tier 2 does (experiments/trigger_search_probe.py measures the search "
          "alone).\n")
    print(f"Usability bar: the attacked watermarked model's trigger-free images (its `[no_trigger]` row) have FID "
          f"at most {FID_BAR} x and CLIP score at least {CLIP_BAR} x those of the unattacked watermarked model "
          f"(both against the clean base model's images of the same prompts and seeds). *Evades and usable* is the "
          f"evasion rate (1 - TPR at FPR 1e-6, the share of marked images the verifier misses) in a usable cell and "
          f"0 in an unusable one. Intervals are 95 %; N is the number of images per cell, so they are wide.\n")
    print("\n".join(lines))
    print("\n## Which tier breaks it\n")
    print("\n".join(verdicts(cells)))
    if missing:
        print("\nNot finished: " + "; ".join(missing))
    print()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m experiments.threats_report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="docs/threats.md from a run of configs/sleepermark-threats.toml (its results database).",
        epilog="example:\n  bench run --config configs/sleepermark-threats.toml --output runs/threats\n"
               "  python -m experiments.threats_report runs/threats/results.sqlite > docs/threats.md")
    ap.add_argument("results", help="the run's results.sqlite")
    main(ap.parse_args().results)
