"""The HTML report: one self-contained file rendered from a results database (and the images it points to).

``render_report(db, out)`` is a pure function of the database: it reads values, intervals and N as stored and never
recomputes a metric. The only pixels it computes are for display (thumbnails and the amplified difference between
a clean and a watermarked image). Everything the page needs is inline: styles, the script that draws the charts,
the data it draws them from (a JSON block) and the images (base64 PNG data URIs). Nothing is fetched.

Escaping: every string from the database (labels, prompts, errors, parameters) goes through :func:`html.escape`
on the server, through ``textContent``/``setAttribute`` in the script, and the JSON block has ``<``, ``>`` and ``&``
written as ``\\u003c``/``\\u003e``/``\\u0026`` so it cannot close its ``<script>`` element.

Sections: leaderboard; results heatmap (defences x attacks, switchable metric, interval and N in every cell);
robustness curves (metric against strength for every swept attack, one line per defence, interval bands);
quality against robustness (every cell: a quality metric against the selected metric); image panels (clean,
watermarked, amplified difference, each attack's output); manifest (config, plugins and parameters, seeds, versions,
git hash, timings, failed cells, negative policy) and a glossary of the metrics. The page's script reads
``#metric=NAME`` (and ``&x=NAME`` for the scatter's x axis) from the URL, and sets ``data-render="ok"`` (or
``"error: ..."``) on the ``<html>`` element when it has drawn everything.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from markbench.registries import STRONGER_LEGEND, STRONGER_MARK

from .data import (IDENTITY, CellRow, Results, describe_metric, is_quality_metric, load_results, prompts_of)
from .leaderboard import build as build_leaderboard
from .answer import answer_html
from .leaderboard import attacker_rows, fmt, fmt_loss, forgery_rows, utility_curves

#: How many prompts get an image panel, how many attack outputs one panel row shows, and the thumbnail side.
MAX_PROMPTS = 3
MAX_ATTACK_IMAGES = 8
MAX_IMAGES = 96  # in all panels together: fewer prompts per defence when there are many defences
THUMB_PX = 128
DIFF_GAIN = 10


def e(x: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if x is None else str(x), quote=True)


def render_report(db_path: str | os.PathLike, out_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  *, max_prompts: int = MAX_PROMPTS, max_attack_images: int = MAX_ATTACK_IMAGES,
                  cells: Iterable[str] | None = None) -> Path:
    """Render the report of ``db_path`` into the single file ``out_path``; returns its path.

    ``cache_dir`` is the artifact cache holding the images (default: ``<db folder>/cache``, else the run's
    ``run.cache`` or ``<run.output>/cache``); without one the image panels say where they looked. ``cells``: only
    these cell labels (a config's grid; :func:`reports.data.load_results`).
    """
    db = Path(db_path)
    results = load_results(db, cells)
    cache, looked = find_cache(results, db, cache_dir)
    page = _page(results, cache, looked, max_prompts, max_attack_images)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def find_cache(results: Results, db: Path, cache_dir: str | os.PathLike | None) -> tuple[Path | None, list[str]]:
    """The artifact cache folder to read images from, and every place looked at."""
    if cache_dir is not None:
        candidates = [Path(cache_dir)]
    else:
        run = results.run_config
        candidates = [db.parent / "cache"]
        if run.get("cache"):
            candidates.append(Path(run["cache"]))
        if run.get("output"):
            candidates.append(Path(run["output"]) / "cache")
    for c in candidates:
        if c.is_dir():
            return c, [str(c)]
    return None, [str(c) for c in candidates]


# ------------------------------------------------------------------------------------------------------------------
# data for the script
# ------------------------------------------------------------------------------------------------------------------
def chart_data(results: Results) -> dict[str, Any]:
    """What the page's script draws from (also embedded as JSON: tests read it back)."""
    notes: dict[str, int] = {}

    def note_id(text: str) -> int | None:
        if not text:
            return None
        return notes.setdefault(text, len(notes))

    cells = []
    for c in results.cells:
        cells.append({
            "row": results.row(c), "col": results.column(c), "label": c.label, "defense": c.defense_label,
            "ok": c.ok, "clean": c.is_clean, "error": c.error, "outside": c.outside_threat_model,
            "v": {m: [v.value, v.low, v.high, v.n, note_id(v.note)] for m, v in c.metrics.items()},
        })
    sweeps = []
    for s in results.sweeps():
        def col(ia_label: str) -> str:
            return f"{s.model_attack_label} | {ia_label}" if results.multi_model_attack else ia_label

        ref = next((results.column(c) for c in results.cells
                    if c.model_attack_base_label == s.model_attack_label and c.image_attack == IDENTITY), None)
        sweeps.append({"attack": s.attack, "ma": s.model_attack_label, "x": s.x_name,
                       "multi_ma": results.multi_model_attack,
                       "points": [[x, col(label)] for x, label in s.points], "ref": ref})
    metrics = [{"name": m, "hib": results.higher_is_better(m), "about": describe_metric(m)}
               for m in _metric_order(results)]
    return {
        "primary": results.primary_metric,
        "metrics": metrics,
        "rows": results.rows(),
        "cols": results.columns(),
        "cells": cells,
        "notes": list(notes),
        "sweeps": sweeps,
        "quality": [m for m in results.metric_order if is_quality_metric(m)],
    }


def _metric_order(results: Results) -> list[str]:
    primary = results.primary_metric
    return ([primary] if primary in results.metric_order else []) + [m for m in results.metric_order if m != primary]


def _json_block(data: Any) -> str:
    text = json.dumps(data, separators=(",", ":"), default=str)
    for a, b in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                 ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text


# ------------------------------------------------------------------------------------------------------------------
# the server-rendered heatmap (what a reader without JavaScript sees; the script redraws it the same way)
# ------------------------------------------------------------------------------------------------------------------
def value_range(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if lo >= 0 and hi <= 1:
        return 0.0, 1.0
    return lo, hi


def colour(v: float, lo: float, hi: float, hib: bool | None) -> str:
    """Cell colour: red (bad) to green (good) for a metric with a direction, white to blue without one."""
    t = 0.5 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
    if hib is None:
        return f"hsl(210,60%,{round(95 - 30 * t)}%)"
    good = t if hib else 1 - t
    return f"hsl({round(120 * good)},55%,80%)"


OUTSIDE_MARK = "\u2020"


def threat_html(results: Results) -> str:
    """Each defence's threat setting (as stored with its cells) and what the dagger in the heatmap means."""
    settings: dict[str, str] = {}
    for c in results.cells:
        if c.threat.get("defense"):
            settings.setdefault(c.defense_label, c.threat["defense"])
    stronger = ""
    if any(c.stronger_than_threat_model for c in results.cells):
        stronger = f'<p class="stronger-legend">{e(STRONGER_LEGEND)}.</p>'
    if not settings:
        return f'<div class="threat">{stronger}</div>' if stronger else ""
    items = "".join(f"<li><b>{e(d)}</b>: protects {e(_SETTING_TEXT.get(t, t))}</li>" for d, t in settings.items())
    dagger = ""
    if any(c.outside_threat_model for c in results.cells):
        dagger = (f"<p>{OUTSIDE_MARK} marks a cell outside its defence's threat model: a model attack (it needs the "
                  "released weights) on a defence that protects only API-served models. It is scored, but it is "
                  "not a robustness claim of that defence.</p>")
    tiers: dict[str, str] = {}
    for c in results.cells:
        if c.threat.get("tier"):
            tiers.setdefault(c.model_attack_label, c.threat["tier"])
    tier_html = ""
    if tiers:
        rows = "".join(f"<li><b>{e(a)}</b>: {e(_TIER_TEXT.get(t, t))}</li>" for a, t in tiers.items())
        tier_html = ("<p>Threat tier of each model attack (what it knows of the defence; a column of a tier above "
                     f"blind is tagged &lt;tier&gt;):</p><ul>{rows}</ul>")
    return (f'<div class="threat"><p>Threat model of each defence:</p><ul>{items}</ul>{dagger}{stronger}{tier_html}'
            '</div>')


_TIER_TEXT = {"blind": "blind: the released weights only, nothing of the defence",
              "method_known": "method known: which watermark is used and how it works, not its secrets",
              "trigger_known": "trigger known: the defence's trigger, never its key or decoder"}

_SETTING_TEXT = {"api": "a model served behind an API (the provider samples; attackers see images)",
                 "weights": "released weights (the mark lives in them; model attacks are in scope)",
                 "both": "both an API-served model and released weights"}


def heatmap_html(results: Results, metric: str) -> str:
    rows, cols = results.rows(), results.columns()
    by = {(results.row(c), results.column(c)): c for c in results.cells}
    hib = results.higher_is_better(metric)
    vals = [v.value for c in results.ok_cells if (v := results.value(c, metric)) is not None]
    lo, hi = value_range(vals)
    out = [f'<table class="hm" data-metric="{e(metric)}"><thead><tr><th class="corner">defence \\ attack</th>']
    out += [f'<th scope="col">{e(c)}</th>' for c in cols]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append(f'<tr><th scope="row">{e(r)}</th>')
        for col in cols:
            c = by.get((r, col))
            out.append(_td(c, metric, results, lo, hi, hib))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _td(c: CellRow | None, metric: str, results: Results, lo: float, hi: float, hib: bool | None) -> str:
    if c is None:
        return '<td class="na" title="not in the grid">&#8211;</td>'
    if not c.ok:
        return (f'<td class="failed" data-cell="{e(c.label)}" title="{e(c.label)}: failed: {e(c.error)}">'
                f'<span class="v">failed</span></td>')
    v = results.value(c, metric)
    if v is None:
        return (f'<td class="na" data-cell="{e(c.label)}" title="{e(c.label)}: {e(metric)} not measured">'
                f'&#8211;</td>')
    ci = f"[{fmt(v.low)}, {fmt(v.high)}]" if v.low is not None and v.high is not None else "no interval"
    tip = f"{c.label}\n{metric} = {fmt(v.value)} (95% interval {ci}, N = {v.n})" + (f"\n{v.note}" if v.note else "")
    outside = c.outside_threat_model
    if outside:
        tip += "\n" + c.threat.get("note", "outside the defence's threat model")
    stronger = c.stronger_than_threat_model
    if stronger:
        tip += "\n" + STRONGER_LEGEND
    marks = (OUTSIDE_MARK if outside else "") + (STRONGER_MARK if stronger else "")
    return (f'<td class="c{" outside" if outside else ""}{" stronger" if stronger else ""}" data-cell="{e(c.label)}" '
            f'data-value="{v.value!r}" style="background:{colour(v.value, lo, hi, hib)}" title="{e(tip)}">'
            f'<span class="v">{e(fmt(v.value))}{marks}</span>'
            f'<span class="ci">{e(ci)}</span><span class="n">n={v.n}</span></td>')


# ------------------------------------------------------------------------------------------------------------------
# image panels
# ------------------------------------------------------------------------------------------------------------------
def _png_uri(arr) -> str:
    from PIL import Image

    img = Image.fromarray(arr)
    if max(img.size) > THUMB_PX:
        img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _load(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def amplified_difference(clean, marked, gain: int = DIFF_GAIN):
    """|marked - clean| x gain, clipped to 8 bits (for display only); resizes ``marked`` if the sizes differ."""
    import numpy as np
    from PIL import Image

    if marked.shape != clean.shape:
        marked = np.asarray(Image.fromarray(marked).resize((clean.shape[1], clean.shape[0]), Image.Resampling.BILINEAR))
    diff = np.abs(marked.astype(np.int16) - clean.astype(np.int16)) * gain
    return np.clip(diff, 0, 255).astype(np.uint8)


def _image_file(cache: Path, key: str | None, index: int) -> Path | None:
    """The ``index``-th image of the artifact ``key`` (the store's own layout: :class:`bench.cache.ArtifactStore`)."""
    if not key:
        return None
    from markbench.cache import ArtifactStore

    paths = ArtifactStore(cache).image_paths(key)
    return paths[index] if 0 <= index < len(paths) else None


def _figure(uri: str, caption: str, title: str = "") -> str:
    return (f'<figure><img src="{uri}" alt="{e(caption)}" width="{THUMB_PX}" height="{THUMB_PX}" '
            f'title="{e(title or caption)}"><figcaption>{e(caption)}</figcaption></figure>')


def image_panels(results: Results, cache: Path | None, looked: list[str], max_prompts: int,
                 max_attack_images: int) -> str:
    if cache is None:
        return (f'<p class="muted">No image panels: no artifact cache found (looked in '
                f'{e(", ".join(looked))}). Pass <code>cache_dir</code> / run <code>bench report</code> with the '
                f'run\'s config.</p>')
    prompts = prompts_of(results)
    defenses = results.defense_labels()
    non_control = [d for d in defenses if not any(c.defense_label == d and c.defense == "none" for c in results.cells)]
    shown = non_control or defenses
    seed = min((c.seed for c in results.cells), default=0)
    per_row = 3 + max_attack_images
    n_prompts = max(1, min(max_prompts, MAX_IMAGES // max(1, len(shown) * per_row)))
    out: list[str] = []
    for d in shown:
        cells = [c for c in results.cells if c.defense_label == d and c.seed == seed]
        if not cells:
            continue
        mas = list(dict.fromkeys(c.model_attack_label for c in cells))
        base_ma = next((c.model_attack_label for c in cells if c.model_attack == IDENTITY), mas[0])
        ref = next((c for c in cells if c.model_attack_label == base_ma and c.image_attack == IDENTITY),
                   next(c for c in cells if c.model_attack_label == base_ma))
        attacked = [(c.image_attack_label, c.attacked_key, c) for c in cells
                    if c.model_attack_label == base_ma and c.image_attack != IDENTITY]
        attacked += [(f"model attack: {c.model_attack_label}", c.watermarked_key, c) for c in cells
                     if c.model_attack_label != base_ma and c.image_attack == IDENTITY]
        attacked = attacked[:max_attack_images]
        rows = []
        for i in range(n_prompts):
            clean_p, marked_p = _image_file(cache, ref.clean_key, i), _image_file(cache, ref.watermarked_key, i)
            if clean_p is None or marked_p is None:
                break
            clean, marked = _load(clean_p), _load(marked_p)
            figs = [_figure(_png_uri(clean), "clean"), _figure(_png_uri(marked), "watermarked"),
                    _figure(_png_uri(amplified_difference(clean, marked)), f"difference x{DIFF_GAIN}",
                            f"|watermarked - clean| x {DIFF_GAIN}, clipped")]
            for label, key, c in attacked:
                p = _image_file(cache, key, i)
                if p is None:
                    figs.append(f'<figure class="missing"><div class="noimg">not in cache</div>'
                                f'<figcaption>{e(label)}</figcaption></figure>')
                else:
                    figs.append(_figure(_png_uri(_load(p)), label, f"{c.label}: image {i}"))
            prompt = prompts[i % len(prompts)] if prompts else f"image {i}"
            rows.append(f'<div class="panel-row"><p class="prompt">#{i}: {e(prompt)}</p>'
                        f'<div class="figs">{"".join(figs)}</div></div>')
        if not rows:
            out.append(f'<h3>{e(d)}</h3><p class="muted">images of this defence are not in the cache '
                       f'{e(cache)}.</p>')
            continue
        ma_note = "" if base_ma == IDENTITY else f" under model attack {e(base_ma)}"
        out.append(f'<h3>{e(d)}{ma_note}</h3>' + "".join(rows))
    note = (f'<p class="muted">Images from the artifact cache <code>{e(cache)}</code> (seed {seed}), the first '
            f'{n_prompts} prompt(s), shown at most {THUMB_PX} px. The difference is |watermarked - clean| amplified '
            f'{DIFF_GAIN} times.'
            + (' The control defence is not shown.' if non_control and len(non_control) < len(defenses) else '')
            + '</p>')
    return note + "".join(out)


# ------------------------------------------------------------------------------------------------------------------
# manifest and glossary
# ------------------------------------------------------------------------------------------------------------------
def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-"


def _kv_table(pairs: list[tuple[str, Any]], cls: str = "kv") -> str:
    return (f'<table class="{cls}">' + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in pairs)
            + "</table>")


def _pre_json(obj: Any) -> str:
    return f"<pre>{e(json.dumps(obj, indent=1, sort_keys=True, default=str))}</pre>"


_NEGATIVES = {
    "attacked": "attacked: the negatives are the unwatermarked model's images for the same prompts and seeds, under "
                "the same model attack and image attack (the fair comparison for the false positive rate).",
    "clean": "clean: the negatives are the unwatermarked base model's images with no attack at all.",
}


def manifest(results: Results) -> str:
    run = results.latest_run
    cfg = results.config
    run_cfg = results.run_config
    parts = ["<h3>Runs</h3>"]
    rows = []
    for r in results.runs:
        secs = (r.finished - r.started) if r.finished and r.started else None
        rows.append(f"<tr><td><code>{e(r.run_id)}</code></td><td>{e(r.status)}</td><td>{e(_when(r.started))}</td>"
                    f"<td>{e(fmt(secs)) if secs is not None else '-'} s</td><td><code>{e(r.git_hash or '-')}</code>"
                    f"</td><td><code>{e(r.command)}</code></td></tr>")
    parts.append('<table class="grid"><thead><tr><th>run</th><th>status</th><th>started</th><th>took</th>'
                 '<th>git hash</th><th>command</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")
    seeds = run_cfg.get("seeds", sorted({c.seed for c in results.cells}))
    neg = run_cfg.get("negatives") or (results.cells[0].negatives if results.cells else "")
    parts.append("<h3>Seeds and negatives</h3>" + _kv_table([
        ("run seeds", ", ".join(str(s) for s in seeds)),
        ("image seeds", "derived from (run seed, image index) by SHA-256; identical across defences, so images are "
                        "paired (bench.plan.image_seed)"),
        ("stage random generators", "torch.Generator seeded from (run seed, stage key) (bench.plan.stage_seed)"),
        ("negative policy", _NEGATIVES.get(neg, neg)),
        ("images per cell", run_cfg.get("num_images", "-")),
        ("target FPRs", ", ".join(f"{x:g}" for x in run_cfg.get("target_fprs", []))),
        ("primary metric", results.primary_metric),
    ]))
    plug_rows: dict[tuple, str] = {}
    for c in results.cells:
        for kind, name, label, params, version, origin in (
                ("defence", c.defense, c.defense_label, c.defense_params, c.defense_version, c.defense_origin),
                ("model attack", c.model_attack, c.model_attack_label, c.model_attack_params,
                 c.model_attack_version, ""),
                ("image attack", c.image_attack, c.image_attack_label, c.image_attack_params,
                 c.image_attack_version, "")):
            key = (kind, label)
            if key not in plug_rows:
                plug_rows[key] = (f"<tr><td>{e(kind)}</td><td>{e(label)}</td><td>{e(name)}</td><td>{e(version)}</td>"
                                  f"<td>{e(origin)}</td><td><code>{e(json.dumps(params, sort_keys=True))}</code>"
                                  f"</td></tr>")
    parts.append('<h3>Plugins and parameters</h3><table class="grid"><thead><tr><th>kind</th><th>label</th>'
                 '<th>plugin</th><th>version</th><th>origin</th><th>parameters (resolved)</th></tr></thead><tbody>'
                 + "".join(plug_rows.values()) + "</tbody></table>")
    if run is not None:
        versions = sorted(run.versions.items()) + [("git hash", run.git_hash or "-")]
        parts.append("<h3>Versions</h3>" + _kv_table(versions))
    # timings
    summary = run.summary if run else {}
    parts.append("<h3>Timings</h3>")
    if summary:
        parts.append(_kv_table([
            ("run seconds", summary.get("seconds", "-")),
            ("cells", f"{summary.get('cells_ok', 0)} computed, {summary.get('cells_skipped', 0)} already done, "
                      f"{len(summary.get('cells_failed', []))} failed, of {summary.get('cells_total', 0)}"),
            ("stages run", ", ".join(f"{k} {v}" for k, v in sorted((summary.get("stages_run") or {}).items()))
             or "none"),
            ("cached stages reused", summary.get("stages_cached", 0)),
        ]))
    kinds = list(dict.fromkeys(k for c in results.cells for k in c.timings))
    if kinds:
        trs = []
        for c in results.cells:
            total = sum(float(v) for v in c.timings.values() if isinstance(v, (int, float)))
            trs.append(f"<tr><td>{e(c.label)}</td>" + "".join(
                f"<td>{e(fmt(c.timings[k])) if isinstance(c.timings.get(k), (int, float)) else ''}</td>"
                for k in kinds) + f"<td>{e(fmt(total))}</td></tr>")
        parts.append(f'<details><summary>seconds per cell and stage ({len(results.cells)} cells; a stage shared by '
                     f'several cells is counted where it ran)</summary><table class="grid"><thead><tr><th>cell</th>'
                     + "".join(f"<th>{e(k)}</th>" for k in kinds) + "<th>total</th></tr></thead><tbody>"
                     + "".join(trs) + "</tbody></table></details>")
    costs = [(c.label, c.costs) for c in results.cells if c.costs]
    if costs:
        parts.append("<details><summary>costs recorded by embedding and model-attack stages</summary>"
                     '<table class="grid">' + "".join(f"<tr><td>{e(label)}</td><td><code>"
                                                       f"{e(json.dumps(cost, sort_keys=True, default=str))}</code>"
                                                       f"</td></tr>" for label, cost in costs) + "</table></details>")
    # failures
    failed = results.failed_cells
    parts.append(f'<h3 id="failed">Failed cells ({len(failed)})</h3>')
    if failed:
        parts.append("".join(
            f'<div class="failure"><p><strong>{e(c.label)}</strong>: {e(c.error)}</p>'
            + (f"<details><summary>traceback</summary><pre>{e(c.traceback)}</pre></details>" if c.traceback else "")
            + "</div>" for c in failed))
    else:
        parts.append('<p class="muted">none</p>')
    parts.append("<h3>Config</h3><details><summary>the full resolved config of the latest run"
                 + (f" ({e(run.config_path)})" if run and run.config_path else "") + "</summary>"
                 + _pre_json(cfg) + "</details>")
    return "".join(parts)


def glossary(results: Results) -> str:
    items = []
    for m in _metric_order(results):
        hib = results.higher_is_better(m)
        direction = {True: "higher is better", False: "lower is better", None: "no direction"}[hib]
        note = results.notes.get(m, "")
        items.append(f"<dt><code>{e(m)}</code> <span class=\"muted\">({direction})</span></dt><dd>"
                     f"{e(describe_metric(m))}" + (f'<br><span class="muted">e.g. {e(note)}</span>' if note else "")
                     + "</dd>")
    items.append("<dt>95% interval, N</dt><dd>Every value comes with a two-sided 95% interval (exact Clopper-Pearson "
                 "for rates, bootstrap over images for means and medians, Student-t for image-quality means) and the "
                 "sample size N it rests on. Non-overlapping intervals are what <code>bench compare</code> treats as "
                 "a real move.</dd>")
    return "<dl>" + "".join(items) + "</dl>"


def leaderboard_html(results: Results) -> str:
    if not results.cells:
        return '<p class="muted">no cells</p>'
    board = build_leaderboard(results)
    quality = list(dict.fromkeys(q for en in board["entries"] for q in en["quality"]))

    head = ("<tr><th>rank</th><th>defence</th><th>clean</th><th>mean over attacks</th><th>worst (attack)</th>"
            + "".join(f"<th>{e(q)}</th>" for q in quality) + "<th>failed</th></tr>")
    body = []
    for en in board["entries"]:
        r = en["robustness"]
        worst = "-" if r["worst"] is None else f"{e(fmt(r['worst']))} ({e(r['worst_attack'])})"
        body.append(f"<tr><td>{en['rank']}</td><td>{e(en['defense_label'])}"
                    + (' <span class="muted">(control)</span>' if en["control"] else "") + "</td>"
                    f"<td>{ci_html(en['clean'])}</td><td>{e(fmt(r['mean']))} "
                    f"<span class=\"muted\">({r['n_cells']} cells)</span></td><td>{worst}</td>"
                    + "".join(f"<td>{ci_html(en['quality'].get(q))}</td>" for q in quality)
                    + f"<td>{en['n_failed']}</td></tr>")
    direction = "higher is better" if board["higher_is_better"] else "lower is better"
    return (f'<p>Ranked by the mean of <code>{e(board["metric"])}</code> ({direction}) over the attacked cells; '
            f'clean = no attack (with its 95% interval); quality = the mark\'s cost.</p>'
            f'<table class="grid lb"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>')


def ci_html(v: dict[str, Any] | None) -> str:
    """A value with its 95% interval (``{"value", "low", "high"}``), escaped; ``-`` for none."""
    if not v:
        return "-"
    t = e(fmt(v["value"]))
    if v.get("low") is not None and v.get("high") is not None:
        t += f' <span class="ci">[{e(fmt(v["low"]))}, {e(fmt(v["high"]))}]</span>'
    return t


def _cost_html(cost: dict[str, Any]) -> str:
    parts = []
    if cost.get("seconds_per_image") is not None:
        parts.append(f"{1000 * cost['seconds_per_image']:.1f} ms/image")
    for k, what in (("model_evals", "model evals"), ("attacker_images", "attacker images")):
        if cost.get(k) is not None:
            parts.append(f"{e(cost[k])} {what}")
    return ", ".join(parts) or "-"


def attacker_html(results: Results) -> str:
    """The forgery cells (false positives of forged clean images) and the removal cells' joint evasion rate and
    cost, as two tables; empty when the run has neither."""
    out = []
    joint = attacker_rows(results)
    if joint:
        fprs = list(dict.fromkeys(f for r in joint for f in r["joint_evasion"]))
        head = ("<tr><th>defence</th><th>model attack</th><th>image attack</th>"
                + "".join(f"<th>joint evasion@{e(f)}</th>" for f in fprs)
                + "<th>quality kept</th><th>content kept</th><th>cost</th></tr>")
        body = "".join(
            f"<tr><td>{e(r['defense_label'])}</td><td>{e(r['model_attack_label'])}</td>"
            f"<td>{e(r['image_attack_label'])}</td>"
            + "".join(f"<td>{ci_html(r['joint_evasion'].get(f))}</td>" for f in fprs)
            + f"<td>{ci_html(r['quality_kept'])}</td><td>{ci_html(r['content_kept'])}</td>"
              f"<td>{_cost_html(r['cost'])}</td></tr>" for r in joint)
        out.append("<h3>Removal: images that evade detection within the quality bound</h3>"
                   '<p class="muted">Per image: not detected at the defence\'s threshold, within the PSNR / SSIM '
                   "bound to the attack's input, and (where the world has a judge) the same content; 95% "
                   "Clopper-Pearson. Cost: the attack's seconds per image, model evaluations, images it needed.</p>"
                   f'<table class="grid"><thead>{head}</thead><tbody>{body}</tbody></table>')
    forged = forgery_rows(results)
    if forged:
        fprs = list(dict.fromkeys(f for r in forged for f in r["forged_fpr"]))
        head = ("<tr><th>defence</th><th>model attack</th><th>forgery</th>"
                + "".join(f"<th>forged FPR@{e(f)}</th><th>clean FPR@{e(f)}</th>" for f in fprs)
                + "<th>joint forgery</th><th>PSNR</th><th>SSIM</th><th>cost</th></tr>")
        body = "".join(
            f"<tr><td>{e(r['defense_label'])}</td><td>{e(r['model_attack_label'])}</td>"
            f"<td>{e(r['image_attack_label'])}</td>"
            + "".join(f"<td>{ci_html(r['forged_fpr'].get(f))}</td><td>{ci_html(r['clean_fpr'].get(f))}</td>"
                      for f in fprs)
            + f"<td>{ci_html(next(iter(r['joint_forgery'].values()), None))}</td>"
              f"<td>{ci_html(r['psnr'])}</td><td>{ci_html(r['ssim'])}</td><td>{_cost_html(r['cost'])}</td></tr>"
            for r in forged)
        out.append("<h3>Forgery: clean images made to read as marked</h3>"
                   '<p class="muted">The clean model\'s images, forged with what the attacker learnt from the marked '
                   "images, against the defence's own threshold: the false-positive rate of the forged images and of "
                   "the same clean images before forging (95% Clopper-Pearson); PSNR / SSIM of the forged images to "
                   "the clean input.</p>"
                   f'<table class="grid"><thead>{head}</thead><tbody>{body}</tbody></table>')
    return "".join(out)


# ------------------------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------------------------
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")  # the script's palette


def utility_html(curves: list[dict[str, Any]], rows: list[str]) -> str:
    """Detection against attacker utility, drawn on the server (plain SVG, no script): one chart per model attack
    and detection metric (:func:`reports.leaderboard.utility_curves`), one line per defence through the attack's
    sweep, 95% whiskers on both axes. Every point carries its values (``data-defense``, ``data-model-attack``,
    ``data-x``, ``data-y``, ``data-y-low``, ``data-y-high``) and a tooltip."""
    if not curves:
        return ('<p class="muted">No model attack with a stored attacker utility (the <code>attacker_utility</code> '
                'metric) in these results.</p>')
    colour_of = {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(rows)}
    W, H, M = 400, 260, {"l": 48, "r": 12, "t": 10, "b": 36}
    out = ['<div class="plots">']
    for cur in curves:
        pts = [p for line in cur["lines"].values() for p in line]
        xs = [v for p in pts for v in (p["x"]["value"], p["x"].get("low"), p["x"].get("high")) if v is not None]
        ys = [v for p in pts for v in (p["y"]["value"], p["y"].get("low"), p["y"].get("high")) if v is not None]

        def rng(vals: list[float]) -> tuple[float, float]:
            lo, hi = min(vals), max(vals)
            if lo >= 0 and hi <= 1:
                return 0.0, 1.0
            pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
            return lo - pad, hi + pad

        (x0, x1), (y0, y1) = rng(xs), rng(ys)

        def sx(x: float) -> float:
            return round(M["l"] + (x - x0) / (x1 - x0) * (W - M["l"] - M["r"]), 2)

        def sy(y: float) -> float:
            return round(H - M["b"] - (y - y0) / (y1 - y0) * (H - M["t"] - M["b"]), 2)

        title = cur["attack"] + (f" ({cur['params']})" if cur["params"] else "")
        svg = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" class="utility-chart" '
               f'data-attack="{e(cur["attack"])}" data-metric="{e(cur["metric"])}" '
               f'data-x-metric="{e(cur["x_metric"])}"><title>{e(cur["metric"])} against {e(cur["x_metric"])} '
               f'under {e(title)}</title>',
               f'<rect x="{M["l"]}" y="{M["t"]}" width="{W - M["l"] - M["r"]}" height="{H - M["t"] - M["b"]}" '
               'fill="#fbfbfc" stroke="#ccc"/>']
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            yv, xv = y0 + t * (y1 - y0), x0 + t * (x1 - x0)
            svg.append(f'<text x="{M["l"] - 4}" y="{sy(yv) + 3}" text-anchor="end">{e(fmt(yv))}</text>')
            svg.append(f'<text x="{sx(xv)}" y="{H - M["b"] + 14}" text-anchor="middle">{e(fmt(xv))}</text>')
        svg.append(f'<text x="{(M["l"] + W - M["r"]) / 2}" y="{H - 4}" text-anchor="middle">'
                   f'{e(cur["x_metric"])} (attacker utility)</text>')
        svg.append(f'<text x="12" y="{(M["t"] + H - M["b"]) / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 12 {(M["t"] + H - M["b"]) / 2})">{e(cur["metric"])}</text>')
        for defense, line in cur["lines"].items():
            c = colour_of.get(defense, "#333")
            svg.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" data-defense="{e(defense)}" points="'
                       + " ".join(f'{sx(p["x"]["value"])},{sy(p["y"]["value"])}' for p in line) + '"/>')
            for p in line:
                x, y = p["x"], p["y"]
                px, py = sx(x["value"]), sy(y["value"])
                if y.get("low") is not None and y.get("high") is not None:
                    svg.append(f'<line x1="{px}" x2="{px}" y1="{sy(y["low"])}" y2="{sy(y["high"])}" stroke="{c}" '
                               'stroke-opacity="0.5"/>')
                if x.get("low") is not None and x.get("high") is not None:
                    svg.append(f'<line x1="{sx(x["low"])}" x2="{sx(x["high"])}" y1="{py}" y2="{py}" stroke="{c}" '
                               'stroke-opacity="0.5"/>')
                tip = (f'{defense} / {p["model_attack"]}: {cur["x_metric"]} = {fmt(x["value"])}, '
                       f'{cur["metric"]} = {fmt(y["value"])} [{fmt(y.get("low"))}, {fmt(y.get("high"))}]'
                       + (f', held-out loss = {fmt_loss(p["loss"])} (lower = more utility)' if p.get("loss") else ""))
                loss_attr = f' data-loss="{p["loss"]["value"]!r}"' if p.get("loss") else ""
                svg.append(f'<circle class="upt" cx="{px}" cy="{py}" r="3.5" fill="{c}" data-defense="{e(defense)}" '
                           f'data-model-attack="{e(p["model_attack"])}" data-x="{x["value"]!r}" '
                           f'data-y="{y["value"]!r}" data-y-low="{y.get("low")!r}" data-y-high="{y.get("high")!r}"'
                           f'{loss_attr}><title>{e(tip)}</title></circle>')
        svg.append("</svg>")
        legend = "".join(f'<span class="item"><span class="sw" style="background:{colour_of.get(d, "#333")}">'
                         f'</span>{e(d)}</span>' for d in cur["lines"])
        loss_rows = [(d, p) for d, line in cur["lines"].items() for p in line if p.get("loss")]
        loss_table = ""
        if loss_rows:  # the held-out downstream loss beside each point's recognition (lower = more utility)
            loss_table = ('<table class="utility-loss"><tr><th>defence</th><th>point</th><th>' + e(cur["x_metric"])
                          + '</th><th>held-out loss (lower = more utility)</th></tr>'
                          + "".join(f'<tr><td>{e(d)}</td><td>{e(p["model_attack"])}</td><td>{e(fmt(p["x"]["value"]))}'
                                    f'</td><td>{e(fmt_loss(p["loss"]))}</td></tr>' for d, p in loss_rows)
                          + "</table>")
        if cur.get("stronger_than_threat_model"):
            title += " " + STRONGER_MARK
        out.append(f'<div class="plot utility"><h4>{e(title)}: {e(cur["metric"])}</h4>{"".join(svg)}'
                   f'<div class="legend">{legend}</div>{loss_table}</div>')
    out.append("</div>")
    return "".join(out)


def _page(results: Results, cache: Path | None, looked: list[str], max_prompts: int, max_attack_images: int) -> str:
    run = results.latest_run
    name = results.run_config.get("name") or "MarkBench run"
    data = chart_data(results)
    primary = results.primary_metric
    n_failed = len(results.failed_cells)
    options = "".join(f'<option value="{e(m["name"])}"{" selected" if m["name"] == primary else ""}>{e(m["name"])}'
                      f'</option>' for m in data["metrics"])
    x_options = "".join(f'<option value="{e(q)}">{e(q)}</option>' for q in data["quality"])
    facts = [f"database <code>{e(results.path)}</code>",
             f"{len(results.cells)} cells ({n_failed} failed)",
             f"N = {e(results.run_config.get('num_images', '-'))} images per cell",
             f"negatives: {e(results.run_config.get('negatives', '-'))}"]
    if run:
        facts += [f"run <code>{e(run.run_id)}</code>", f"code <code>{e(run.git_hash or '-')}</code>",
                  f"finished {e(_when(run.finished or run.started))}"]
    metric_about = describe_metric(primary)
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\" data-render=\"pending\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<title>MarkBench report: {e(name)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>MarkBench report: {e(name)}</h1><p class=\"facts\">{' &middot; '.join(facts)}</p>",
        '<p id="js-errors" class="error" hidden></p>',
        '<nav><a href="#answer">the answer</a> <a href="#leaderboard">leaderboard</a> '
        '<a href="#matrix">results matrix</a> '
        '<a href="#curves">robustness curves</a> <a href="#utility">detection vs. utility</a> '
        '<a href="#tradeoff">quality vs. robustness</a> '
        '<a href="#images">images</a> <a href="#manifest">manifest</a> <a href="#glossary">glossary</a></nav></header>',
        '<main>',
        '<section id="answer"><h2>The answer: what survived which attack, at what utility and fidelity</h2>',
        answer_html(results, e, ci_html),
        '<div id="utility"><h3>Detection against attacker utility</h3>',
        '<p class="muted">Per model attack: each defence\'s detection (y) against what the attack gave the attacker '
        '(x: the share of the attacked watermarked model\'s images that show the fine-tune\'s new style or subject; '
        'for attacks without a downstream task the paired CLIP-score change), one line per defence through the '
        'attack\'s sweep, whiskers are 95% intervals. A mark that survives only at low utility survives an attack '
        'that did not do what the attacker wanted.</p>',
        f'{utility_html(utility_curves(results), results.defense_labels())}</div></section>',
        f'<section id="leaderboard"><h2>Leaderboard</h2>{leaderboard_html(results)}</section>',
        *([f'<section id="attacker"><h2>Forgery and the attacker\'s joint success</h2>{attacker}</section>']
          if (attacker := attacker_html(results)) else []),
        '<section id="matrix"><h2>Results matrix</h2>',
        f'<p><label>metric <select id="metric">{options}</select></label> '
        f'<span id="metric-about" class="muted">{e(metric_about)}</span></p>',
        '<p class="muted">Each cell: the value, its 95% interval and N (hover for the note). Green is good, red is '
        'bad, for the metric\'s direction; blue for metrics without one. Failed cells are hatched.</p>',
        f'<div id="heatmap" class="scroll">{heatmap_html(results, primary) if results.cells else ""}</div>'
        f'{threat_html(results)}</section>',
        '<section id="curves"><h2>Robustness curves</h2>',
        '<p class="muted">The selected metric against each swept attack\'s strength (or its natural parameter), one '
        'line per defence, with the 95% interval as a band; the dashed line is the same defence without an image '
        'attack.</p>',
        '<div id="curve-legend" class="legend"></div><div id="curve-plots" class="plots">'
        '<noscript>The charts need JavaScript.</noscript></div></section>',

        '<section id="tradeoff"><h2>Quality vs. robustness</h2>',
        (f'<p><label>quality (x axis) <select id="xmetric">{x_options}</select></label> '
         f'<span class="muted">against the selected metric (y axis); one point per cell, whiskers are 95% '
         f'intervals.</span></p>' if data["quality"] else
         '<p class="muted">No quality metric (PSNR, SSIM, FID, CLIP score) in these results.</p>'),
        '<div id="scatter" class="plots"></div></section>',
        f'<section id="images"><h2>Images</h2>{image_panels(results, cache, looked, max_prompts, max_attack_images)}'
        '</section>',
        f'<section id="manifest"><h2>Manifest</h2>{manifest(results)}</section>',
        f'<section id="glossary"><h2>Glossary</h2>{glossary(results)}</section>',
        '</main><footer class="muted">Rendered by MarkBench from the results database alone; no metric is recomputed '
        'here.</footer>',
        f'<script type="application/json" id="report-data">{_json_block(data)}</script>',
        f"<script>{_JS}</script></body></html>\n",
    ])


def _static(name: str) -> str:
    """A file of ``reports/static`` (the page's stylesheet and script, kept as real CSS / JS files)."""
    from importlib.resources import files

    return files("markbench.reports").joinpath("static", name).read_text(encoding="utf-8")


_CSS = _static("report.css")
_JS = _static("report.js")
