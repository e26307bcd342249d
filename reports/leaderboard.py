"""Leaderboards: defences ranked by robustness across the grid, with quality beside it (one entry per defence).

The JSON file is versioned (``"schema_version": 1``; documented in ``docs/reports.md``); the Markdown fits a
pull-request comment or a CI job summary. Both are pure functions of the results database: the aggregate columns
(mean and worst over attacked cells) summarise stored values; no metric is recomputed.

* **Ranking metric**: the run's primary metric (``run.primary_metric``, e.g. ``tpr@1e-06``) unless told otherwise.
* **Attacked cells**: every cell of the defence except the clean one (no model attack and no image attack).
* **robustness.mean**: the mean of the ranking metric over the attacked cells that measured it (failed cells are
  counted in ``n_failed`` and left out of the mean); **robustness.worst**: the worst of them and which attack.
* **Several seeds** (each a new key, embedding and attack run): a summary is the mean over seeds with a
  hierarchical-bootstrap interval (seeds, then images), and says how many embeddings and attack runs it rests on;
  ``per_attack_summary`` gives that per attack column. Repeated attack runs (``[run] attack_seeds``) are nested
  in their seed (seeds, then attack runs, then images).
* Ranked by ``robustness.mean`` (best first, per the metric's direction), then ``robustness.worst``, then ``clean``,
  then the control (the defence named ``none``) after the others; defences without a value come last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

from markbench.errors import UserError
from markbench.registries import STRONGER_LEGEND, STRONGER_MARK

from .data import IDENTITY, CellRow, Results, Value, is_quality_metric, load_results, mean

SCHEMA_VERSION = 1
KIND = "markbench-leaderboard"


def short_hash(git_hash: Any) -> str:
    """A results file's commit as the generated headers show it: 12 hex digits, and ``+dirty`` kept when the run was
    made from a tree with uncommitted changes (the hash alone would name a commit that may lack the config)."""
    if not git_hash:
        return "?"
    h = str(git_hash)
    return h[:12] + ("+dirty" if h.endswith("+dirty") else "")


def _summary(values: list[Value], attacked: bool = False, n_embeddings: int | None = None,
             seeds: list[int] | None = None) -> dict[str, Any] | None:
    """One cell: its value, interval and N. Several (one per run seed: each a new key, embedding and, in an attacked
    cell, attack run): the mean of the seeds' values with a hierarchical-bootstrap interval (seeds resampled, then
    images within each: :func:`bench.stats.hierarchical_bootstrap`) where every cell stored its per-image values,
    else no interval; a rate (every per-image value 0 or 1) gets the envelope of that interval and the pooled
    count's exact Clopper-Pearson interval (:func:`bench.stats.hierarchical_rate`); ROC AUC (positives' and
    negatives' placements stored) resamples each repetition's positives and negatives apart
    (:func:`bench.stats.hierarchical_auc`). ``n_embeddings`` / ``n_attack_runs`` say how many independent
    repetitions stand behind it.

    ``seeds``: the run seed of each value. Repeated attack runs (``[run] attack_seeds``) share their run seed's key
    and embedding, so the values of one run seed are nested in it: the bootstrap resamples run seeds, then the
    attack runs within each drawn seed, then images (a three-level bootstrap), and the spread between attack runs
    widens the interval. The value is then the mean over run seeds of the mean over their attack runs. Without
    ``seeds`` (or with one value per seed) every value is its own repetition, as before."""
    pairs = [(v, None if seeds is None else seeds[i]) for i, v in enumerate(values)
             if v is not None and v.value is not None]
    vals = [v for v, _ in pairs]
    if not vals:
        return None
    runs = list(dict.fromkeys(s for _, s in pairs)) if seeds is not None else []
    reps = {"n_embeddings": min(n_embeddings or len(runs) or len(vals), len(vals)),
            "n_attack_runs": len(vals) if attacked else 0}
    if len(vals) == 1:
        v = vals[0]
        return {"value": v.value, "low": v.low, "high": v.high, "n": v.n, "n_cells": 1, **reps}
    nested = [[v for v, s in pairs if s == r] for r in runs]
    if nested and any(len(g) > 1 for g in nested):
        value = mean(mean(v.value for v in g) for g in nested)
    else:
        nested, value = [], mean(v.value for v in vals)
    out = {"value": value, "low": None, "high": None, "n": sum(v.n for v in vals), "n_cells": len(vals), **reps}
    if all(v.samples for v in vals):
        import numpy as np

        from markbench import stats

        def leaf(v: Value) -> Any:  # a two-sample statistic (ROC AUC) resamples its positives and negatives apart
            if not v.samples_neg:
                return v.samples
            return stats.Placements(np.asarray(v.samples, dtype=float), np.asarray(v.samples_neg, dtype=float))

        groups = ([[leaf(v) for v in g] if len(g) > 1 else leaf(g[0]) for g in nested] if nested
                  else [leaf(v) for v in vals])
        if all(v.samples_neg for v in vals):
            est = stats.hierarchical_auc(groups)
            out.update(value=est.value, low=est.low, high=est.high, n=est.n,
                       interval="hierarchical bootstrap, positives and negatives resampled apart")
        elif stats.is_binary(groups):  # a rate: never narrower than the pooled count's exact interval
            est = stats.hierarchical_rate(groups)
            out.update(value=est.value, low=est.low, high=est.high, n=est.n,
                       interval="envelope of hierarchical bootstrap and pooled Clopper-Pearson")
        else:
            est = stats.hierarchical_bootstrap(groups)
            out.update(value=est.value, low=est.low, high=est.high, n=est.n, interval="hierarchical bootstrap")
    return out


def build(results: Results, metric: str | None = None) -> dict[str, Any]:
    """The leaderboard document (schema version 1) of a loaded results database."""
    available = results.metric_order
    if metric is None:  # the run's primary metric, or what its results have (markbench.config.shown_metric)
        from markbench.config import shown_metric

        metric = shown_metric(results.primary_metric, available) or results.primary_metric
    if available and metric not in available:
        from markbench.registry import suggest

        raise UserError(f"--metric {metric!r}: no such metric in {results.path}{suggest(metric, available)}; "
                        f"available: {', '.join(available)}")
    hib = results.higher_is_better(metric)
    if hib is None:
        hib = True
    quality = [m for m in available if is_quality_metric(m)]
    entries = []
    for defense in results.defense_labels():
        cells = [c for c in results.cells if c.defense_label == defense]
        clean = [c for c in cells if c.is_clean]
        attacked = [c for c in cells if not c.is_clean]
        measured = [(c, results.value(c, metric)) for c in attacked if c.ok]
        measured = [(c, v) for c, v in measured if v is not None]
        robustness: dict[str, Any] = {"mean": None, "worst": None, "worst_attack": None,
                                      "n_cells": len(measured), "n_attacked": len(attacked)}
        per_attack: dict[str, list[tuple[int, float]]] = {}
        for c, v in measured:
            per_attack.setdefault(results.column(c), []).append((c.seed, v.value))
        # a column's value: the mean over run seeds of each seed's mean over its attack runs (as its interval nests
        # them), so that repeating a training attack with more attack seeds does not weigh it more than the others
        column_value = {k: mean(mean(v for s, v in pts if s == seed) for seed in dict.fromkeys(s for s, _ in pts))
                        for k, pts in per_attack.items()}
        if column_value:
            worst = (min if hib else max)(column_value, key=column_value.get)
            robustness.update(mean=mean(column_value.values()), worst=column_value[worst], worst_attack=worst)
        ref = clean or cells
        first = cells[0]
        entries.append({
            "rank": None,
            "defense": first.defense,
            "defense_label": defense,
            "defense_params": first.defense_params,
            "defense_version": first.defense_version,
            "defense_origin": first.defense_origin,
            "control": first.defense == "none",
            "clean": _summary([results.value(c, metric) for c in clean if c.ok]),
            "robustness": robustness,
            "per_attack": column_value,
            "per_attack_summary": {
                k: _summary([v for c, v in measured if results.column(c) == k],
                            attacked=any(c.model_attack != IDENTITY for c, _ in measured if results.column(c) == k),
                            seeds=[c.seed for c, _ in measured if results.column(c) == k])
                for k in per_attack},
            "quality": {q: s for q in quality
                        if (s := _summary([results.value(c, q) for c in ref if c.ok])) is not None},
            "n_cells": len(cells),
            "n_failed": sum(1 for c in cells if not c.ok),
        })

    def sort_key(e):
        sign = -1 if hib else 1
        r = e["robustness"]
        clean = (e["clean"] or {}).get("value")
        return (r["mean"] is None, sign * (r["mean"] or 0.0), r["worst"] is None, sign * (r["worst"] or 0.0),
                clean is None, sign * (clean or 0.0), e["control"])

    # the ranking metric and every detection metric (a score defence's empirical-threshold TPR too: its per-image
    # outcomes combine over attack runs, where its AUC, which stores none, cannot)
    curves = utility_curves(results, [m for m in dict.fromkeys([metric, *detection_metrics(results), "bit_accuracy"])
                                      if m in available])
    # the columns whose model attack assumes more than its threat model (merge(other=base)): marked in the Markdown
    stronger = list(dict.fromkeys(results.column(c) for c in results.cells if c.stronger_than_threat_model))
    entries.sort(key=sort_key)
    for i, e in enumerate(entries, 1):
        e["rank"] = i
    run = results.latest_run
    run_cfg = results.run_config
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "database": str(results.path),
            "run_ids": [r.run_id for r in results.runs],
            "run_name": run_cfg.get("name", ""),
            "config_path": run.config_path if run else "",
            "git_hash": run.git_hash if run else "",
            "versions": run.versions if run else {},
        },
        "metric": metric,
        "higher_is_better": hib,
        "negatives": run_cfg.get("negatives", ""),
        "n_images": run_cfg.get("num_images"),
        "grid": {
            "defenses": results.defense_labels(),
            "model_attacks": list(dict.fromkeys(c.model_attack_label for c in results.cells)),
            "image_attacks": list(dict.fromkeys(c.image_attack_label for c in results.cells)),
            "seeds": sorted({c.seed for c in results.cells}),
            "metrics": available,
        },
        "entries": entries,
        "cells": [
            {"defense_label": c.defense_label, "model_attack_label": c.model_attack_label,
             "image_attack_label": c.image_attack_label, "seed": c.seed, "metric": m,
             "value": v.value, "low": v.low, "high": v.high, "n": v.n, "higher_is_better": v.higher_is_better}
            for c in results.ok_cells for m, v in c.metrics.items()
        ],
        **({"utility_curves": curves} if curves else {}),
        **({"stronger_than_threat_model": stronger} if stronger else {}),
        # sections present only when the run has them, so a grid without forgeries or joint rates keeps its document
        **({"forgery": forgery_rows(results)} if results.forgery_cells else {}),
        **({"attacker": attacker_rows(results)} if any(_joint(c) for c in results.ok_cells) else {}),
        **({"model_attacks": rows} if (rows := model_attack_rows(results)) else {}),
    }


# -- forgery and the attacker's joint success ------------------------------------------------------------------------
def _v(v) -> dict[str, Any] | None:
    return None if v is None else {"value": v.value, "low": v.low, "high": v.high, "n": v.n}


def _joint(c: CellRow, prefix: str = "joint_evasion@") -> dict[str, Any]:
    return {m[len(prefix):]: _v(v) for m, v in c.metrics.items() if m.startswith(prefix)}


def _cost(c: CellRow) -> dict[str, Any]:
    cost = c.costs.get("forge") or c.costs.get("image_attack") or {}
    n = cost.get("images") or c.n_images or None
    out = {k: cost.get(k) for k in ("seconds", "model_evals", "attacker_images", "images") if cost.get(k) is not None}
    if n and cost.get("seconds") is not None:
        out["seconds_per_image"] = cost["seconds"] / n
    surrogate = c.costs.get("surrogate") or {}  # a surrogate-detector attack's training (its own cached stage)
    if surrogate:
        out["surrogate"] = {k: surrogate[k] for k in ("attacker_images", "seconds", "train_accuracy")
                            if surrogate.get(k) is not None}
    return out


def forgery_rows(results: Results) -> list[dict[str, Any]]:
    """One row per forgery cell: the forged images' FPR at the defence's threshold beside the clean images' FPR
    (Clopper-Pearson), their quality to the clean input, the joint forgery rate and the attack's cost."""
    rows = []
    for c in results.forgery_cells:
        rows.append({
            "defense_label": c.defense_label, "model_attack_label": c.model_attack_label,
            "image_attack_label": c.image_attack_label, "seed": c.seed, "status": c.status,
            "forged_fpr": {m[len("forged_fpr@"):]: _v(v) for m, v in c.metrics.items() if m.startswith("forged_fpr@")},
            "clean_fpr": {m[len("clean_fpr@"):]: _v(v) for m, v in c.metrics.items() if m.startswith("clean_fpr@")},
            "psnr": _v(c.metrics.get("psnr_attack")), "ssim": _v(c.metrics.get("ssim_attack")),
            "joint_forgery": _joint(c, "joint_forgery@"), "cost": _cost(c),
        })
    return rows


def model_attack_rows(results: Results) -> list[dict[str, Any]]:
    """One row per (defence, model attack, seed) with a model attack that changed something: its threat tier (what it
    knew of the defence, stored with the cell) and its cost as the attack recorded it on the watermarked model (its
    scalar entries: steps, trainable parameters, what a search found ...; ``seconds``: the stage's)."""
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for c in results.ok_cells:
        if c.model_attack == IDENTITY or not c.threat.get("tier"):
            continue
        key = (c.defense_label.split("[")[0], c.model_attack_label, c.seed)
        cost = {k: v for k, v in (c.costs.get("model_attack") or {}).items()
                if isinstance(v, (int, float, str, bool))}
        row = out.setdefault(key, {"defense_label": key[0], "model_attack_label": key[1], "seed": key[2],
                                   "tier": c.threat.get("tier", ""), "cost": {}})
        row["cost"].update(cost)
    return list(out.values())


def attacker_rows(results: Results) -> list[dict[str, Any]]:
    """One row per attacked removal cell with a joint rate: the fraction of images that evade detection within the
    quality bound (and keep their content), and the attack's cost."""
    return [{"defense_label": c.defense_label, "model_attack_label": c.model_attack_label,
             "image_attack_label": c.image_attack_label, "seed": c.seed, "joint_evasion": _joint(c),
             "quality_kept": _v(c.metrics.get("quality_kept")), "content_kept": _v(c.metrics.get("content_kept")),
             "cost": _cost(c)}
            for c in results.ok_cells if not c.is_clean and _joint(c)]


def _fmt_v(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    if v.get("low") is None or v.get("high") is None:
        return fmt(v["value"])
    return f"{fmt(v['value'])} [{fmt(v['low'])}, {fmt(v['high'])}]"


def image_attack_cost_text(cost: dict[str, Any] | None) -> str:
    """An image attack's recorded cost (the ``cost`` of a forgery or attacker row) in a few words: time per image,
    model evaluations, images the attacker needed, and a surrogate detector's training where it had one."""
    cost = cost or {}
    parts = []
    if cost.get("seconds_per_image") is not None:
        parts.append(f"{1000 * cost['seconds_per_image']:.1f} ms/image")
    if cost.get("model_evals") is not None:
        parts.append(f"{cost['model_evals']} model evals")
    if cost.get("attacker_images") is not None:
        parts.append(f"{cost['attacker_images']} attacker images")
    s = cost.get("surrogate")
    if s:
        acc = s.get("train_accuracy")
        parts.append(f"surrogate: {s.get('attacker_images', '?')} images, {s.get('seconds', 0):.0f} s"
                     + (f", training accuracy {acc:.2f}" if acc is not None else ""))
    return ", ".join(parts) or "-"


def forgery_markdown(board: dict[str, Any]) -> list[str]:
    rows = board.get("forgery") or []
    if not rows:
        return []
    fprs = list(dict.fromkeys(f for r in rows for f in r["forged_fpr"]))
    lines = ["", "#### Forgery: clean images made to read as marked (false positives; lower is better for the "
             "defence)", "",
             "| defence | model attack | forgery | " + " | ".join(f"forged FPR@{_md(f)} (clean)" for f in fprs)
             + " | joint forgery | PSNR / SSIM to the clean input | cost |",
             "|:---|:---|:---|" + "---:|" * (len(fprs) + 3)]
    for r in rows:
        jf = next(iter(r["joint_forgery"].values()), None)
        q = f"{fmt((r['psnr'] or {}).get('value'))} / {fmt((r['ssim'] or {}).get('value'))}"
        lines.append(f"| {_md(r['defense_label'])} | {_md(r['model_attack_label'])} | {_md(r['image_attack_label'])}"
                     " | " + " | ".join(f"{_fmt_v(r['forged_fpr'].get(f))} ({_fmt_v(r['clean_fpr'].get(f))})"
                                      for f in fprs)
                     + f" | {_fmt_v(jf)} | {q} | {image_attack_cost_text(r['cost'])} |")
    return lines


def attacker_markdown(board: dict[str, Any]) -> list[str]:
    rows = board.get("attacker") or []
    if not rows:
        return []
    fprs = list(dict.fromkeys(f for r in rows for f in r["joint_evasion"]))
    lines = ["", "#### The attacker's joint success: images that evade detection and stay within the quality bound",
             "", "| defence | model attack | image attack | " + " | ".join(f"joint evasion@{_md(f)}" for f in fprs)
             + " | quality kept | content kept | cost |", "|:---|:---|:---|" + "---:|" * (len(fprs) + 3)]
    for r in rows:
        lines.append(f"| {_md(r['defense_label'])} | {_md(r['model_attack_label'])} | {_md(r['image_attack_label'])}"
                     " | " + " | ".join(_fmt_v(r["joint_evasion"].get(f)) for f in fprs)
                     + f" | {_fmt_v(r['quality_kept'])} | {_fmt_v(r['content_kept'])} | "
                       f"{image_attack_cost_text(r['cost'])} |")
    return lines


# -- detection against attacker utility ----------------------------------------------------------------------------
#: The x axis of a model attack's curve: the first of these every cell of the attack stored (bench.measures.utility):
#: recognition of a fine-tune's new style or subject, else the quality kept (paired CLIP-score change).
UTILITY_X = ("utility_downstream", "utility_clip_delta")
#: Shown beside the x of a point wherever its cells stored it: the attacked watermarked model's held-out downstream
#: loss (lower = more utility; bench.measures.utility)
UTILITY_LOSS = "utility_heldout_loss"


def detection_metrics(results: Results) -> list[str]:
    """The detection metrics of a database: every ``tpr@...`` and ``bit_accuracy``, in the stored order."""
    return [m for m in results.metric_order if m.startswith("tpr@") or m == "bit_accuracy"]


def _params_key(params: dict[str, Any]) -> str:
    """The non-numeric parameters of a model attack (its data, method, the model merged in ...): cells that share
    them lie on one line; numeric ones (steps, lr, sparsity ...) move along it."""
    fixed = {k: v for k, v in sorted(params.items())
             if not (isinstance(v, (int, float)) and not isinstance(v, bool))}
    return ", ".join(f"{k}={v}" for k, v in fixed.items())


def utility_curves(results: Results, metrics: list[str] | None = None) -> list[dict[str, Any]]:
    """Per model attack (and its non-numeric parameters) and detection metric: one line per defence through the
    attack's sweep, each point (x = the attacker's utility of the attacked watermarked model, y = detection) with
    its interval, from the cells with that model attack and no image attack. Several seeds at one point combine
    as the leaderboard's cells do (:func:`_summary`: mean with a hierarchical-bootstrap interval). Points sorted by
    utility. Nothing is recomputed: values and intervals are the stored ones."""
    metrics = detection_metrics(results) if metrics is None else metrics
    groups: dict[tuple[str, str], list[CellRow]] = {}
    for c in results.ok_cells:
        if c.image_attack != IDENTITY or c.model_attack == IDENTITY:
            continue
        groups.setdefault((c.model_attack, _params_key(c.model_attack_params)), []).append(c)
    out = []
    for (attack, fixed), cells in groups.items():
        x_metric = next((m for m in UTILITY_X if all(results.value(c, m) is not None for c in cells)), None)
        if x_metric is None:
            continue
        for metric in metrics:
            lines: dict[str, list[dict[str, Any]]] = {}
            for defense in results.defense_labels():
                by_label: dict[str, list[CellRow]] = {}
                for c in cells:
                    if c.defense_label == defense:
                        by_label.setdefault(c.model_attack_base_label, []).append(c)
                pts = []
                for label, cs in by_label.items():
                    ys = [results.value(c, metric) for c in cs]
                    if any(y is None for y in ys):
                        continue
                    seeds = [c.seed for c in cs]
                    point = {"model_attack": label,
                             "x": _summary([results.value(c, x_metric) for c in cs], True, seeds=seeds),
                             "y": _summary(ys, True, seeds=seeds)}
                    losses = [results.value(c, UTILITY_LOSS) for c in cs]
                    if all(v is not None for v in losses):
                        point["loss"] = _summary(losses, True, seeds=seeds)
                    pts.append(point)
                if pts:
                    lines[defense] = sorted(pts, key=lambda p: p["x"]["value"])
            if lines:
                has_loss = any("loss" in p for pts in lines.values() for p in pts)
                stronger = any(c.stronger_than_threat_model for c in cells)
                out.append({"attack": attack, "params": fixed, "x_metric": x_metric, "metric": metric,
                            **({"loss_metric": UTILITY_LOSS} if has_loss else {}),
                            **({"stronger_than_threat_model": True} if stronger else {}), "lines": lines})
    return out


# -- Markdown -----------------------------------------------------------------------------------------------------
def _md(text: Any) -> str:
    """Text safe inside a Markdown table cell (GitHub renders some HTML: escape it; pipes split cells)."""
    s = str(text)
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("\n", " "), ("`", "\\`"),
                 ("*", "\\*"), ("_", "\\_"), ("[", "\\["), ("]", "\\]")):
        s = s.replace(a, b)
    return s


def _code(text: Any) -> str:
    """A Markdown code span (no escapes work inside one: backticks are the only thing to keep out)."""
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a < 10:
        return f"{v:.3f}"
    if a < 1e4:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _fmt_summary(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    out = fmt(s["value"])
    if s.get("low") is not None and s.get("high") is not None:
        out += f" [{fmt(s['low'])}, {fmt(s['high'])}]"
    if (s.get("n_embeddings") or 1) > 1 or (s.get("n_attack_runs") or 1) > 1:
        out += f" ({s['n_embeddings']} embedding{'s' if s['n_embeddings'] != 1 else ''}" + (
            f", {s['n_attack_runs']} attack runs" if s.get("n_attack_runs") else "") + ")"
    return out


def to_markdown(board: dict[str, Any], per_attack: bool = True) -> str:
    """A Markdown table of a leaderboard document."""
    metric = board["metric"]
    quality = list(dict.fromkeys(q for e in board["entries"] for q in e["quality"]))
    direction = "higher is better" if board["higher_is_better"] else "lower is better"
    src = board.get("source", {})
    lines = [f"### MarkBench leaderboard: {_code(metric)} ({direction})", ""]
    head = ["rank", "defence", f"clean {_md(metric)}", "mean over attacks", "worst (attack)"]
    head += [_md(q) for q in quality] + ["failed cells"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---:"] + [":---"] + ["---:"] * (len(head) - 2)) + "|")
    for e in board["entries"]:
        r = e["robustness"]
        name = _md(e["defense_label"]) + (" (control)" if e.get("control") else "")
        worst = ("-" if r["worst"] is None
                 else f"{fmt(r['worst'])} ({_md(r['worst_attack'])}{_mark(board, r['worst_attack'])})")
        mean_s = "-" if r["mean"] is None else f"{fmt(r['mean'])} ({r['n_cells']} cells)"
        row = [str(e["rank"]), name, _fmt_summary(e["clean"]), mean_s, worst]
        row += [_fmt_summary(e["quality"].get(q)) for q in quality] + [str(e["n_failed"])]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    grid = board.get("grid", {})
    if not board["entries"]:
        lines += ["_No results in this database._", ""]
    facts = [f"negatives: {_md(board.get('negatives') or '-')}",
             f"N = {board.get('n_images') if board.get('n_images') is not None else '-'} images per cell",
             f"seeds: {', '.join(str(s) for s in grid.get('seeds', [])) or '-'}",
             f"{len(grid.get('model_attacks', []))} model attack(s) x {len(grid.get('image_attacks', []))} "
             f"image attack(s)"]
    if src.get("git_hash"):
        facts.append(f"code {_code(short_hash(src['git_hash']))}")
    lines.append("; ".join(facts) + ". Clean = no attack, with its 95% interval; mean and worst over the attacked "
                                    "cells. Quality: the mark's cost (marked vs. the clean model's images made the "
                                    "same way, the right twin) and keyless visibility (AUC 0.5 = invisible).")
    if per_attack and any(e["per_attack"] for e in board["entries"]):
        cols = list(dict.fromkeys(k for e in board["entries"] for k in e["per_attack"]))
        lines += ["", f"<details><summary>{_md(metric)} per attack</summary>", "",
                  "| defence | " + " | ".join(_md(c) + _mark(board, c) for c in cols) + " |",
                  "|:---|" + "---:|" * len(cols)]
        for e in board["entries"]:
            lines.append(f"| {_md(e['defense_label'])} | "
                         + " | ".join(fmt(e["per_attack"].get(c)) for c in cols) + " |")
        lines += ["", "</details>"]
    lines += utility_markdown(board.get("utility_curves") or [])
    lines += attacker_markdown(board) + forgery_markdown(board)
    if board.get("stronger_than_threat_model") or any(c.get("stronger_than_threat_model")
                                                      for c in board.get("utility_curves") or []):
        lines += ["", _md(STRONGER_LEGEND) + "."]
    return "\n".join(lines) + "\n"


def _mark(board: dict[str, Any], column: str | None) -> str:
    """The stronger-than-threat-model marker of a column the board lists (:data:`STRONGER_MARK`), else nothing."""
    return " " + STRONGER_MARK if column in (board.get("stronger_than_threat_model") or []) else ""


def _fmt_point(p: dict[str, Any]) -> str:
    x = p["x"]
    utility = fmt(x["value"])
    if x.get("low") is not None and x.get("high") is not None:
        utility += f" [{fmt(x['low'])}, {fmt(x['high'])}]"
    if p.get("loss"):
        utility += f" (held-out loss {fmt_loss(p['loss'])})"
    return f"{utility} &rarr; {_fmt_summary(p['y'])}"


def fmt_loss(s: dict[str, Any] | None) -> str:
    """A held-out loss summary, four decimals (its values are about 0.01-0.05), with its interval."""
    from .readme import format_interval  # the one interval formatter (readme imports this module: imported here)

    return format_interval(s, 4)


def utility_markdown(curves: list[dict[str, Any]]) -> list[str]:
    """The leaderboard's section on detection against attacker utility (empty without model-attack sweeps)."""
    if not curves:
        return []
    out = ["", "#### Detection against attacker utility", "",
           "Per model attack, each defence's detection at each point of the attack's sweep, written "
           "`utility -> detection [95% interval]`, in order of the utility the attacker got (the share of the "
           "attacked watermarked model's images showing the fine-tune's new style or subject, or for attacks "
           "without a downstream task the paired CLIP-score change); where measured, the attacked watermarked "
           "model's held-out downstream loss beside it (`utility_heldout_loss`: its denoising loss on the task's "
           "held-out images; lower = more utility). A mark that survives only where the attacker got nothing "
           "survives nothing."]
    for cur in curves:
        title = cur["attack"] + (f" ({cur['params']})" if cur["params"] else "")
        title += f" {STRONGER_MARK}" if cur.get("stronger_than_threat_model") else ""
        out += ["", f"**{_md(title)}**: {_code(cur['metric'])} against {_code(cur['x_metric'])}", "",
                "| defence | points (model attack: utility &rarr; detection) |", "|:---|:---|"]
        for defense, pts in cur["lines"].items():
            out.append(f"| {_md(defense)} | " + "; ".join(f"{_md(p['model_attack'])}: {_fmt_point(p)}"
                                                            for p in pts) + " |")
    return out


# -- files --------------------------------------------------------------------------------------------------------
def write_leaderboard(db_path: str | Path, out_json: str | Path | None = None, out_md: str | Path | None = None,
                      metric: str | None = None, cells: Iterable[str] | None = None) -> dict[str, Any]:
    """Build the leaderboard of a database and write it as JSON and/or Markdown; returns the document. ``cells``:
    only these cell labels (a config's grid; :func:`reports.data.load_results`)."""
    board = build(load_results(db_path, cells), metric)
    if out_json is not None:
        p = Path(out_json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(board, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    if out_md is not None:
        p = Path(out_md)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(to_markdown(board), encoding="utf-8")
    return board


def load_leaderboard(path: str | Path) -> dict[str, Any]:
    """Read a leaderboard JSON file, checking its kind and schema version (a :class:`UserError` otherwise)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{p}: cannot read the leaderboard file ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{p}: not a JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise UserError(f"{p}: not a MarkBench leaderboard (expected \"kind\": \"{KIND}\")")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{p}: leaderboard schema_version {version!r} is not supported; this MarkBench reads "
                        f"version {SCHEMA_VERSION}")
    if not isinstance(doc.get("cells"), list) or not isinstance(doc.get("entries"), list):
        raise UserError(f"{p}: leaderboard has no 'cells' and 'entries' lists")
    return doc
