"""Reading a results database for reports, leaderboards and comparisons.

Only :mod:`sqlite3` and the standard library: no pandas, no torch. The database is opened read-only, so rendering
a report can never change the results it shows. Nothing here computes a metric: values, intervals and N are read
as stored; the only derived things are labels, orderings and which cells form a sweep.

A *grid position* is (defence label, model attack label, image attack label, seed). When a database holds several
cells for one position (a config changed between runs), the most recently written one is used, as ``bench show``
does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from markbench.errors import UserError
from markbench.store import NEGATIVE_SAMPLES

#: The registered name of the identity plugin, for image attacks and model attacks alike.
IDENTITY = "none"

_TABLES = ("runs", "cells", "results")
_ATTACK_SEED = re.compile(r"^(.*) a(\d+)$")


@dataclass(frozen=True)
class Value:
    """One stored number: value, 95% interval (``None`` where not defined), N, note and direction."""

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0
    note: str = ""
    higher_is_better: bool | None = None
    #: the per-image values behind a mean or rate, where stored (``samples`` table): for combining seeds
    samples: tuple[float, ...] | None = field(default=None, repr=False, compare=False)
    #: a two-sample statistic's negatives' values (ROC AUC's placements; ``samples`` then holds the positives')
    samples_neg: tuple[float, ...] | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


@dataclass
class Run:
    run_id: str
    started: float | None
    finished: float | None
    status: str
    command: str
    config_path: str
    config: dict[str, Any]
    versions: dict[str, str]
    git_hash: str
    summary: dict[str, Any]


@dataclass
class CellRow:
    """One cell of the grid with its stored measurements (``metrics``: name -> :class:`Value`)."""

    cell_id: str
    run_id: str
    label: str
    seed: int
    defense: str
    defense_label: str
    defense_params: dict[str, Any]
    defense_version: str
    defense_origin: str
    model_attack: str
    model_attack_label: str
    model_attack_params: dict[str, Any]
    model_attack_version: str
    image_attack: str
    image_attack_label: str
    image_attack_params: dict[str, Any]
    image_attack_version: str
    negatives: str
    n_images: int
    status: str
    error: str
    traceback: str
    timings: dict[str, float]
    costs: dict[str, Any]
    stage_keys: list[str]
    updated: float
    metrics: dict[str, Value] = field(default_factory=dict)
    #: the defence's threat setting and whether this cell lies outside it (bench.plugins.threat_scope); empty for
    #: databases written before it was recorded
    threat: dict[str, Any] = field(default_factory=dict)
    #: ``removal`` (marked images attacked) or ``forgery`` (clean images forged; bench.plan.Cell.axis)
    axis: str = "removal"

    @property
    def outside_threat_model(self) -> bool:
        return bool(self.threat.get("outside", False))

    @property
    def stronger_than_threat_model(self) -> bool:
        """Whether the cell's model attack assumes more than its threat model gives the attacker (its declared
        ``beyond_threat_model``, e.g. ``merge(other=base)``): :func:`bench.registries.exceeds_threat_model`."""
        from markbench.registries import exceeds_threat_model

        return exceeds_threat_model(self.model_attack, self.model_attack_params)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_clean(self) -> bool:
        """Neither a model attack nor an image attack: the defence as shipped."""
        return self.image_attack == IDENTITY and self.model_attack == IDENTITY

    @property
    def attack_seed(self) -> int:
        """The attack seed of a repeated training attack (``[run] attack_seeds``; labelled ``<label> a<k>`` by
        bench.plan.attack_runs), 0 for the first run and for every other attack."""
        m = _ATTACK_SEED.match(self.model_attack_label)
        return int(m.group(2)) if m and self.model_attack != IDENTITY else 0

    @property
    def model_attack_base_label(self) -> str:
        """The model attack's label without its attack seed: what repeated attack runs share."""
        m = _ATTACK_SEED.match(self.model_attack_label)
        return m.group(1) if m and self.model_attack != IDENTITY else self.model_attack_label

    @property
    def position(self) -> tuple[str, str, str, int]:
        return (self.defense_label, self.model_attack_label, self.image_attack_label, self.seed)

    # The stage keys, named (see bench.plan.Cell.stage_keys for the order).
    def _key(self, i: int) -> str | None:
        return self.stage_keys[i] if len(self.stage_keys) > i else None

    @property
    def attacked_key(self) -> str | None:
        return self._key(2)

    @property
    def watermarked_key(self) -> str | None:
        return self._key(3)

    @property
    def clean_key(self) -> str | None:
        return self._key(4)


@dataclass
class Results:
    """Everything a report needs from one database."""

    path: Path
    runs: list[Run]
    cells: list[CellRow]  # one per grid position, in the order they were first written
    metric_order: list[str]
    notes: dict[str, str]  # metric -> one representative note
    #: the forgery cells (``axis = "forgery"``), kept apart: ``cells`` and everything built on it (heatmap,
    #: leaderboard ranking, compare) are removal cells only
    forgery_cells: list[CellRow] = field(default_factory=list)

    # -- the run --------------------------------------------------------------------------------------------
    @property
    def latest_run(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    @property
    def config(self) -> dict[str, Any]:
        run = self.latest_run
        return run.config if run else {}

    @property
    def run_config(self) -> dict[str, Any]:
        return self.config.get("run", {}) or {}

    @property
    def primary_metric(self) -> str:
        wanted = self.run_config.get("primary_metric") or "tpr@1e-06"
        if wanted in self.metric_order or not self.metric_order:
            return wanted
        return self.metric_order[0]

    # -- the grid -------------------------------------------------------------------------------------------
    @property
    def ok_cells(self) -> list[CellRow]:
        return [c for c in self.cells if c.ok]

    @property
    def failed_cells(self) -> list[CellRow]:
        return [c for c in self.cells if not c.ok]

    @property
    def multi_model_attack(self) -> bool:
        return len({c.model_attack_base_label for c in self.cells}) > 1

    @property
    def multi_seed(self) -> bool:
        return len({c.seed for c in self.cells}) > 1

    @property
    def multi_attack_seed(self) -> bool:
        return len({c.attack_seed for c in self.cells}) > 1

    def column(self, cell: CellRow) -> str:
        """The heatmap column of a cell: the image attack, prefixed by the model attack when there are several
        (without its attack seed: repeated attack runs share a column, as run seeds do)."""
        if self.multi_model_attack:
            tier = cell.threat.get("tier", "")
            ma = cell.model_attack_base_label + (f" <{tier}>" if tier and tier != "blind" else "")
            return f"{ma} | {cell.image_attack_label}"
        return cell.image_attack_label

    def row(self, cell: CellRow) -> str:
        """The heatmap row of a cell: the defence, with the seed and the attack seed when there are several."""
        return (cell.defense_label + (f" s{cell.seed}" if self.multi_seed else "")
                + (f" a{cell.attack_seed}" if self.multi_attack_seed else ""))

    def rows(self) -> list[str]:
        return list(dict.fromkeys(self.row(c) for c in self.cells))

    def columns(self) -> list[str]:
        cols = list(dict.fromkeys(self.column(c) for c in self.cells))
        # the unattacked column first: it is the reference every other column is read against
        clean = [c for c in cols if any(self.column(x) == c and x.is_clean for x in self.cells)]
        return clean + [c for c in cols if c not in clean]

    def defense_labels(self) -> list[str]:
        return list(dict.fromkeys(c.defense_label for c in self.cells))

    def higher_is_better(self, metric: str) -> bool | None:
        for c in self.cells:
            v = c.metrics.get(metric)
            if v is not None and v.higher_is_better is not None:
                return v.higher_is_better
        return None

    def value(self, cell: CellRow, metric: str) -> Value | None:
        v = cell.metrics.get(metric)
        return v if v is not None and v.value is not None else None

    def sweeps(self) -> list["Sweep"]:
        """Attacks measured at two or more strengths (or values of one natural parameter) under one model attack."""
        groups: dict[tuple[str, str], list[CellRow]] = {}
        for c in self.cells:
            if c.image_attack == IDENTITY:
                continue
            groups.setdefault((c.model_attack_base_label, c.image_attack), []).append(c)
        out = []
        for (ma_label, attack), cells in groups.items():
            x_name = sweep_parameter([c.image_attack_params for c in cells])
            if x_name is None:
                continue
            points = sorted({(float(c.image_attack_params[x_name]), c.image_attack_label) for c in cells})
            out.append(Sweep(attack=attack, model_attack_label=ma_label, x_name=x_name,
                             points=[(x, label) for x, label in points]))
        return out


@dataclass
class Sweep:
    """One robustness curve: an attack under a model attack, and the (x, image attack label) points it has."""

    attack: str
    model_attack_label: str
    x_name: str
    points: list[tuple[float, str]]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def sweep_parameter(param_dicts: list[dict[str, Any]]) -> str | None:
    """The parameter a set of one attack's cells is swept over: ``strength`` when every cell sets it, else the first
    numeric parameter (alphabetically) that every cell sets and that takes two or more values; ``None`` otherwise."""
    if len(param_dicts) < 2:
        return None

    def varies(name: str) -> bool:
        vals = [p.get(name) for p in param_dicts]
        return all(_is_number(v) for v in vals) and len({float(v) for v in vals}) >= 2

    if varies("strength"):
        return "strength"
    names = sorted(set().union(*param_dicts) - {"strength"})
    return next((n for n in names if varies(n)), None)


def _json(text: Any, default: Any) -> Any:
    if text in (None, ""):
        return default
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


def _bool(x: Any) -> bool | None:
    return None if x is None else bool(x)


def _float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open a results database read-only, or raise a :class:`UserError` naming the file."""
    if not path.exists():
        raise UserError(f"{path}: no such results database; run 'bench run' first")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a results.sqlite file")
    try:
        con = sqlite3.connect(f"file:{quote(path.resolve().as_posix())}?mode=ro", uri=True)
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not a MarkBench results database ({exc})") from None
    missing = [t for t in _TABLES if t not in names]
    if missing:
        con.close()
        raise UserError(f"{path}: not a MarkBench results database (missing table(s) {', '.join(missing)})")
    return con


def load_results(db_path: str | Path, cells: Iterable[str] | None = None) -> Results:
    """Read a ``results.sqlite`` into :class:`Results` (read-only; raises :class:`UserError` on a bad file).

    ``cells``: keep only the cells with these labels (``defence/model attack/image attack/sN``: a config's grid,
    :func:`markbench.plan.grid_labels`), so that cells an earlier version of the config left in the same database
    do not join its tables; ``None``: every cell."""
    path = Path(db_path)
    keep = None if cells is None else set(cells)
    con = connect_readonly(path)
    try:
        con.row_factory = sqlite3.Row
        runs = [Run(run_id=r["run_id"], started=r["started"], finished=r["finished"], status=r["status"] or "",
                    command=r["command"] or "", config_path=r["config_path"] or "",
                    config=_json(r["config_json"], {}), versions=_json(r["versions_json"], {}),
                    git_hash=r["git_hash"] or "", summary=_json(r["summary_json"], {}))
                for r in con.execute("SELECT * FROM runs ORDER BY started, rowid")]
        by_id: dict[str, CellRow] = {}
        for r in con.execute("SELECT * FROM cells ORDER BY updated, rowid"):
            if keep is not None and r["label"] not in keep:
                continue
            by_id[r["cell_id"]] = CellRow(
                cell_id=r["cell_id"], run_id=r["run_id"] or "", label=r["label"] or "", seed=int(r["seed"] or 0),
                defense=r["defense"] or "", defense_label=r["defense_label"] or "",
                defense_params=_json(r["defense_params"], {}), defense_version=r["defense_version"] or "",
                defense_origin=r["defense_origin"] or "", model_attack=r["model_attack"] or "",
                model_attack_label=r["model_attack_label"] or "",
                model_attack_params=_json(r["model_attack_params"], {}),
                model_attack_version=r["model_attack_version"] or "", image_attack=r["image_attack"] or "",
                image_attack_label=r["image_attack_label"] or "",
                image_attack_params=_json(r["image_attack_params"], {}),
                image_attack_version=r["image_attack_version"] or "", negatives=r["negatives"] or "",
                n_images=int(r["n_images"] or 0), status=r["status"] or "", error=r["error"] or "",
                traceback=r["traceback"] or "", timings=_json(r["timings_json"], {}),
                costs=_json(r["costs_json"], {}), stage_keys=_json(r["stage_keys_json"], []),
                updated=float(r["updated"] or 0.0),
                threat=_json(r["threat_json"], {}) if "threat_json" in r.keys() else {},
                axis=(r["axis"] if "axis" in r.keys() else None) or "removal")
        metric_order: dict[str, None] = {}
        notes: dict[str, str] = {}
        for r in con.execute("SELECT * FROM results ORDER BY rowid"):
            cell = by_id.get(r["cell_id"])
            metric = r["metric"]
            metric_order.setdefault(metric, None)
            if r["note"] and metric not in notes:
                notes[metric] = r["note"]
            if cell is None:
                continue
            cell.metrics[metric] = Value(_float(r["value"]), _float(r["low"]), _float(r["high"]), int(r["n"] or 0),
                                         r["note"] or "", _bool(r["higher_is_better"]))
        has_samples = con.execute("SELECT 1 FROM sqlite_master WHERE name='samples'").fetchone() is not None
        for r in (con.execute("SELECT * FROM samples") if has_samples else ()):
            cell = by_id.get(r["cell_id"])
            metric, negatives = r["metric"], r["metric"].endswith(NEGATIVE_SAMPLES)
            if negatives:
                metric = metric[:-len(NEGATIVE_SAMPLES)]
            v = cell.metrics.get(metric) if cell is not None else None
            if v is not None:
                values = tuple(float(x) for x in _json(r["values_json"], []))
                cell.metrics[metric] = dataclasses.replace(v, **{"samples_neg" if negatives else "samples": values})
    finally:
        con.close()
    latest: dict[tuple, CellRow] = {}
    for c in by_id.values():  # ordered by `updated`: a later cell at the same position replaces an earlier one
        latest.pop(c.position, None)
        latest[c.position] = c
    first_seen = {}
    for c in by_id.values():
        first_seen.setdefault(c.position, len(first_seen))
    cells = sorted(latest.values(), key=lambda c: first_seen[c.position])
    return Results(path=path, runs=runs, cells=[c for c in cells if c.axis != "forgery"],
                   metric_order=list(metric_order), notes=notes,
                   forgery_cells=[c for c in cells if c.axis == "forgery"])


def resolve_db(path: str | Path) -> Path:
    """A results database given as the file itself or as the run folder that holds ``results.sqlite``."""
    p = Path(path)
    if p.is_dir():
        db = p / "results.sqlite"
        if not db.exists():
            raise UserError(f"{p}: folder has no results.sqlite; run 'bench run' with this output folder first")
        return db
    return p


# -- metric descriptions (the report's glossary) ------------------------------------------------------------------
_GLOSSARY = {
    "bit_accuracy": "Mean over images of the fraction of message bits read correctly (multi-bit defences); "
                    "95% bootstrap over images. 1 = every bit read, about 0.5 = chance.",
    "bit_accuracy_neg": "Bit accuracy on the negatives (images without the mark): about 0.5 expected.",
    "log10_pvalue_median": "Median over images of log10 of the one-sided binomial p-value P(X >= matches), "
                           "X ~ Binomial(bits, 0.5); lower is stronger evidence of the mark.",
    "auc": "ROC AUC of positives (marked, attacked) against negatives (Mann-Whitney, ties count half); "
           "95% stratified bootstrap.",
    "psnr_watermark": "PSNR (dB) of the marked, unattacked image against its right twin: the clean model's image "
                      "made the same way (same prompt, seed and model attack; for a trigger defence the clean model "
                      "given the trigger): what the mark costs. Capped at 100 dB.",
    "psnr_attack": "PSNR (dB) of the attacked image against the unattacked marked image: how much the attack "
                   "changed the image. Capped at 100 dB.",
    "ssim_watermark": "SSIM of the marked, unattacked image against its right twin (the clean model's image made "
                      "the same way): what the mark costs.",
    "fid_twin": "FID of the marked, unattacked images against their right twins (the equally attacked clean "
                "model's images made the same way, e.g. given the trigger): the mark's cost alone.",
    "clip_score_twin": "CLIP score of the right twins (the equally attacked clean model's images made the same way) "
                       "with the captions: what the marked images are compared with.",
    "keyless_auc": "ROC AUC of the mean Laplacian energy (no key) of the marked images against their right twins: "
                   "0.5 = the statistic cannot tell them apart; far from 0.5 on either side = the mark is visible.",
    "keyless_classifier_auc": "Held-out ROC AUC of a logistic regression on image statistics trained without the "
                              "key to tell marked images from their right twins (cross-fitted over pairs): 0.5 = "
                              "invisible to it.",
    "clip_score_twin_delta": "Marked, unattacked images' CLIP score minus their right twins' (paired): the mark's "
                             "own cost in text alignment.",
    "ssim_attack": "SSIM of the attacked image against the unattacked marked image: the attack's distortion.",
}


def describe_metric(name: str) -> str:
    """One sentence saying what a metric means (generic for plugin metrics the report does not know)."""
    if name in _GLOSSARY:
        return _GLOSSARY[name]
    m = re.fullmatch(r"(tpr|fpr)@fpr<=(\d+)/(\d+)", name)
    if m:  # an empirical threshold, named by the FPR its negatives resolve (bench.stats.empirical_fpr_label)
        kind, k, n = m.groups()
        where = (f"an empirical threshold set on {n} negatives that lets at most {k} of them through: the lowest FPR "
                 f"{n} negatives can resolve is 1/{n}, whatever the target FPR was (not an analytic guarantee)")
        if kind == "tpr":
            return f"True positive rate at {where}; exact Clopper-Pearson interval."
        return f"False positive rate measured on the negatives at {where}; exact Clopper-Pearson interval."
    m = re.fullmatch(r"(tpr|fpr)@(.+)", name)
    if m:
        kind, fpr = m.groups()
        if kind == "tpr":
            return (f"True positive rate at a target false positive rate of {fpr}: the fraction of marked, attacked "
                    f"images detected at the analytic threshold that guarantees FPR {fpr} under the null "
                    f"(binomial tail); exact Clopper-Pearson interval.")
        return (f"False positive rate measured on the negatives at the threshold set for FPR {fpr}; exact "
                f"Clopper-Pearson interval (small N cannot resolve small FPRs: see the note).")
    m = re.fullmatch(r"(forged_fpr|clean_fpr|joint_evasion|joint_forgery)@(.+)", name)
    if m:  # bench.measures.forgery
        kind, at = m.groups()
        return {"forged_fpr": f"Forgery cells: the fraction of forged clean images the verifier accepts at its "
                              f"threshold for FPR {at}; exact Clopper-Pearson interval.",
                "clean_fpr": f"Forgery cells: the same clean images before forging, at the threshold for FPR {at} "
                             f"(the baseline the forgery raises).",
                "joint_evasion": f"Per image: not detected at the threshold for FPR {at}, within the quality bound "
                                 f"to the attack's input, and the content kept (where the world judges it); "
                                 f"Clopper-Pearson.",
                "joint_forgery": f"Forgery cells, per image: accepted as marked at the threshold for FPR {at} "
                                 f"within the quality bound to the clean input; Clopper-Pearson."}[kind]
    if name in ("quality_kept", "content_kept"):
        return ("Fraction of attacked images within the joint_evasion metric's PSNR / SSIM bound to the attack's "
                "input." if name == "quality_kept" else
                "Fraction of attacked images whose content the world's judge (tiny world: zero-shot CLIP shape and "
                "colour) reads as unchanged.")
    low = name.lower()
    if "fid" in low:
        return "Frechet Inception Distance between image sets (lower is closer); N = images per set."
    if "clip" in low:
        return "CLIP score: agreement between an image and its prompt under a CLIP model (higher is closer)."
    return "A metric provided by a plugin (see its documentation with 'bench ls metrics -v')."


def is_quality_metric(name: str) -> bool:
    """A metric of the mark's cost to image quality or of its visibility without the key (what the leaderboard shows
    beside robustness)."""
    low = name.lower()
    return low.endswith("_watermark") or "fid" in low or "clip" in low or low.startswith("keyless")


def prompts_of(results: Results) -> list[str]:
    """The run's prompts, best effort (from the stored config; an empty list when they cannot be recovered)."""
    cfg = results.config.get("prompts", {}) or {}
    if cfg.get("list"):
        return [str(p) for p in cfg["list"]]
    if cfg.get("file"):
        p = Path(cfg["file"])
        if not p.is_absolute():
            p = Path(results.config.get("path", "") or ".").parent / p
        try:
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        except OSError:
            return []
        return [ln for ln in lines if ln and not ln.startswith("#")]
    from markbench.config import DEFAULT_PROMPT_SET
    from markbench.errors import UserError
    from markbench.world import load_prompt_set

    try:
        if cfg.get("builtin"):
            return load_prompt_set(f"builtin:{cfg['builtin']}")
        return load_prompt_set(cfg.get("set") or DEFAULT_PROMPT_SET)
    except UserError:  # a world of the stored run is not installed here
        return []


def mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
