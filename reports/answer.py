"""The report's first section: per defence, what survived which model attack, at what attacker utility and what
fidelity, beside what the papers report (``reports/reported.toml``), with the disagreements said in words.

Everything is read from the stored results (nothing recomputed); several run seeds combine as in the leaderboard.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from .data import IDENTITY, CellRow, Results, describe_metric
from .leaderboard import UTILITY_LOSS, UTILITY_X, _summary, fmt_loss

#: a detection rate at or above this counts as "still detected" in the verdicts (most marked images flagged)
SURVIVES = 0.5
#: fidelity and keyless detectability of the unattacked marked images (against the right twin), in this order
FIDELITY = ("psnr_watermark", "ssim_watermark", "keyless_auc")


@dataclass(frozen=True)
class Reported:
    """One number a paper reports (an entry of ``reports/reported.toml``)."""

    defense: str
    model_attack: str
    metric: str
    value: float
    setting: str
    source: str
    match: dict[str, Any] = field(default_factory=dict)

    def matches(self, cell: CellRow) -> bool:
        return (cell.defense == self.defense and cell.model_attack == self.model_attack
                and all(cell.model_attack_params.get(k) == v for k, v in self.match.items()))


def load_reported(text: str | None = None) -> list[Reported]:
    """The reported numbers (``text``: a TOML document of the same shape, for tests)."""
    if text is None:
        text = files("markbench.reports").joinpath("reported.toml").read_text(encoding="utf-8")
    return [Reported(r["defense"], r["model_attack"], r["metric"], float(r["value"]), r.get("setting", ""),
                     r.get("source", ""), dict(r.get("match", {}))) for r in tomllib.loads(text).get("reported", [])]


def _detection_metric(results: Results, cells: list[CellRow]) -> str | None:
    """The detection number of these cells: the run's primary metric where they have it, else a zero-bit
    defence's empirical operating point (``tpr@fpr<=k/N``), its AUC, or bit accuracy."""
    names = [results.primary_metric, *sorted({m for c in cells for m in c.metrics if m.startswith("tpr@fpr<=")}),
             "auc", "bit_accuracy"]
    return next((m for m in names if cells and all(results.value(c, m) is not None for c in cells)), None)


def _utility_metric(results: Results, cells: list[CellRow]) -> str | None:
    return next((m for m in UTILITY_X if cells and all(results.value(c, m) is not None for c in cells)), None)


def build(results: Results, reported: list[Reported] | None = None) -> dict[str, Any]:
    """The section's content: model-attack columns, one row per defence (detection and utility per column,
    fidelity of the unattacked marked images), the reported rows, verdicts and disagreements."""
    reported = load_reported() if reported is None else reported
    plain = [c for c in results.ok_cells if c.image_attack == IDENTITY]
    columns = list(dict.fromkeys(c.model_attack_base_label for c in plain))
    columns = [c for c in columns if c == IDENTITY] + [c for c in columns if c != IDENTITY]
    rows, verdicts, disagreements, reported_rows = [], [], [], []
    for defense in results.defense_labels():
        mine = [c for c in plain if c.defense_label == defense]
        if not mine:
            continue
        row: dict[str, Any] = {"defense": defense, "control": mine[0].defense == IDENTITY, "cells": {},
                               "fidelity": {}}
        clean = [c for c in mine if c.model_attack == IDENTITY]
        for m in FIDELITY:
            if clean and all(results.value(c, m) is not None for c in clean):
                row["fidelity"][m] = _summary([results.value(c, m) for c in clean])
        for col in columns:
            cells = [c for c in mine if c.model_attack_base_label == col]
            metric = _detection_metric(results, cells)
            if metric is None:
                continue
            attacked = col != IDENTITY
            runs = len({c.seed for c in cells})
            seeds = [c.seed for c in cells]  # attack runs of one run seed are nested in it (leaderboard._summary)
            entry = {"metric": metric, "detection": _summary([results.value(c, metric) for c in cells], attacked,
                                                             seeds=seeds), "n_embeddings": runs}
            u = _utility_metric(results, cells) if attacked else None
            if u is not None:
                entry["utility_metric"] = u
                entry["utility"] = _summary([results.value(c, u) for c in cells], True, seeds=seeds)
                losses = [results.value(c, UTILITY_LOSS) for c in cells]
                if all(v is not None for v in losses):  # the held-out downstream loss beside it (lower = more)
                    entry["utility_loss"] = _summary(losses, True, seeds=seeds)
            row["cells"][col] = entry
        rows.append(row)
        for rep in reported if not _is_variant(mine[0]) else ():
            hits = [c for c in mine if rep.matches(c)]
            if not hits:
                continue
            col = hits[0].model_attack_base_label
            reported_rows.append({"defense": defense, "column": col, "reported": rep})
            vals = [results.value(c, rep.metric) for c in hits]
            if any(v is None for v in vals):
                continue
            s = _summary(vals, col != IDENTITY, seeds=[c.seed for c in hits])
            lo, hi = s.get("low"), s.get("high")
            if lo is not None and hi is not None and not lo <= rep.value <= hi:
                disagreements.append(
                    f"{defense} under {col}: {rep.metric} {_f(s['value'])} [{_f(lo)}, {_f(hi)}] here, "
                    f"{rep.value:g} reported ({rep.setting}; {rep.source})")  # as printed, unrounded
        if not row["control"]:
            verdicts.append(_verdict(row, columns))
    return {"columns": columns, "rows": rows, "reported": reported_rows, "verdicts": verdicts,
            "disagreements": disagreements}


def _is_variant(cell: CellRow) -> bool:
    """A defence's second way of generating (``sleepermark[no_trigger]``): the papers' numbers are about the
    defence as deployed, not about its variants."""
    return cell.defense_label.endswith("]") and cell.defense_label.startswith(cell.defense + "[")


def _f(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3f}"


def _verdict(row: dict[str, Any], columns: list[str]) -> str:
    """One sentence: detected unattacked or not, which attacks it survived and which broke it (a TPR at or above
    :data:`SURVIVES` survives), each with the attacker's utility, and the fidelity it pays."""
    parts = []
    clean = row["cells"].get(IDENTITY)
    if clean:
        parts.append(f"unattacked {clean['metric']} {_f(clean['detection']['value'])}")
    kept, broken, unjudged = [], [], []
    for col in columns:
        entry = row["cells"].get(col)
        if col == IDENTITY or entry is None:
            continue
        util = (f", utility {_f(entry['utility']['value'])}" if entry.get("utility") else ", utility not measured")
        if entry.get("utility_loss"):
            util += f", held-out loss {entry['utility_loss']['value']:.4f}"
        text = f"{col} ({entry['metric']} {_f(entry['detection']['value'])}{util})"
        if not entry["metric"].startswith("tpr@"):
            unjudged.append(text)
        elif entry["detection"]["value"] >= SURVIVES:
            kept.append(text)
        else:
            broken.append(text)
    if kept:
        parts.append("still detected after " + "; ".join(kept))
    if broken:
        parts.append("broken by " + "; ".join(broken))
    if unjudged:
        parts.append("no detection rate under " + "; ".join(unjudged))
    fid = row["fidelity"]
    if fid:
        parts.append("fidelity to the right twin " + ", ".join(f"{m} {_f(s['value'])}" for m, s in fid.items()))
    return f"{row['defense']}: " + "; ".join(parts) + "."


def answer_html(results: Results, escape, ci, reported: list[Reported] | None = None) -> str:
    """The section as HTML (``escape`` and ``ci``, a value with its interval, are the report's own helpers)."""
    doc = build(results, reported)
    if not doc["rows"]:
        return '<p class="muted">No finished cell without an image attack.</p>'
    e = escape
    summ = ci

    fid_cols = [m for m in FIDELITY if any(m in r["fidelity"] for r in doc["rows"])]
    head = ("<tr><th>defence</th>" + "".join(f"<th>{e(c)}</th>" for c in doc["columns"])
            + "".join(f"<th>{e(m)}</th>" for m in fid_cols) + "</tr>")
    body = []
    for r in doc["rows"]:
        tds = []
        for col in doc["columns"]:
            entry = r["cells"].get(col)
            if entry is None:
                tds.append("<td>-</td>")
                continue
            util = (f'<br><span class="muted">{e(entry["utility_metric"])} {summ(entry["utility"])}</span>'
                    if entry.get("utility") else "")
            if entry.get("utility_loss"):
                util += (f'<br><span class="muted">held-out loss (lower = more utility) '
                         f'{e(fmt_loss(entry["utility_loss"]))}</span>')
            tds.append(f'<td data-metric="{e(entry["metric"])}">{summ(entry["detection"])} '
                       f'<span class="muted">{e(entry["metric"])}</span>{util}</td>')
        tds += [f"<td>{summ(r['fidelity'].get(m))}</td>" for m in fid_cols]
        body.append(f'<tr><td>{e(r["defense"])}' + (' <span class="muted">(control)</span>' if r["control"] else "")
                    + "</td>" + "".join(tds) + "</tr>")
        for rep_row in [x for x in doc["reported"] if x["defense"] == r["defense"]]:
            rep: Reported = rep_row["reported"]
            cells = "".join(
                f'<td class="reported" title="{e(rep.setting)}; {e(rep.source)}">{e(f"{rep.value:g}")} '
                f'<span class="muted">{e(rep.metric)}, reported</span></td>' if c == rep_row["column"] else "<td></td>"
                for c in doc["columns"])
            body.append(f'<tr class="reported"><td class="muted">{e(r["defense"])}, reported '
                        f'<span class="ci">({e(rep.source)})</span></td>{cells}'
                        + "<td></td>" * len(fid_cols) + "</tr>")
    metrics_used = sorted({en["metric"] for r in doc["rows"] for en in r["cells"].values()})
    notes = "".join(f"<li><code>{e(m)}</code>: {e(describe_metric(m))}</li>" for m in metrics_used)
    verdicts = "".join(f"<li>{e(v)}</li>" for v in doc["verdicts"])
    disagree = ("<p><b>Where this run and the papers disagree</b> (the reported number outside this run's 95% "
                "interval):</p><ul>" + "".join(f"<li>{e(d)}</li>" for d in doc["disagreements"]) + "</ul>"
                if doc["disagreements"] else
                ('<p class="muted">No reported number falls outside this run\'s interval where both exist.</p>'
                 if doc["reported"] else ""))
    return (f'<ul class="verdicts">{verdicts}</ul>'
            '<p class="muted">Detection per model attack without an image attack (the run\'s primary metric where '
            'the defence has it, else its empirical operating point, AUC or bit accuracy: each cell names its '
            'metric), with the attacker\'s utility of the attacked watermarked model under it; fidelity and keyless '
            'detectability of the unattacked marked images against their right twin. Rows marked "reported" are '
            'the papers\' numbers, at their own setting (hover), not this run\'s. 95% intervals in brackets; '
            f'"still detected" means a TPR of at least {SURVIVES}.</p>'
            f'<table class="grid answer"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
            f'{disagree}<ul class="muted">{notes}</ul>')
