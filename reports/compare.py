"""Compare two results (leaderboard JSON files, results databases or run folders) cell by cell.

Cells are matched on (defence label, model attack label, image attack label, seed, metric). For a matched cell with
a direction (``higher_is_better``), the move from baseline to current is

* a **regression** when it goes the bad way, the two 95% intervals do not overlap (touching counts as overlap) and
  the absolute change exceeds the tolerance (``--tolerance``, default 0);
* an **improvement** when it goes the good way under the same two conditions;
* otherwise within noise.

A value stored without an interval is its own (zero-width) interval. Metrics without a direction (e.g.
``bit_accuracy_neg``) are reported as *changed* under the same conditions, never as regressions. Cells present on
one side only are reported as missing or new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markbench.errors import UserError

Key = tuple[str, str, str, int, str]  # defence, model attack, image attack, seed, metric


@dataclass(frozen=True)
class Point:
    value: float | None
    low: float | None
    high: float | None
    n: int
    higher_is_better: bool | None

    @property
    def lo(self) -> float:
        return self.low if self.low is not None else self.value  # type: ignore[return-value]

    @property
    def hi(self) -> float:
        return self.high if self.high is not None else self.value  # type: ignore[return-value]


@dataclass(frozen=True)
class Change:
    key: Key
    baseline: Point
    current: Point

    @property
    def delta(self) -> float:
        return self.current.value - self.baseline.value  # type: ignore[operator]

    def as_dict(self) -> dict[str, Any]:
        d, ma, ia, seed, metric = self.key
        return {"defense_label": d, "model_attack_label": ma, "image_attack_label": ia, "seed": seed,
                "metric": metric, "baseline": vars(self.baseline), "current": vars(self.current),
                "delta": self.delta}


@dataclass
class Comparison:
    baseline: str
    current: str
    tolerance: float
    regressions: list[Change] = field(default_factory=list)
    improvements: list[Change] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)  # moved beyond noise, metric without a direction
    within_noise: int = 0
    not_comparable: list[Key] = field(default_factory=list)  # a value missing on one side
    missing: list[Key] = field(default_factory=list)  # in the baseline, not in the current results
    new: list[Key] = field(default_factory=list)  # in the current results, not in the baseline

    @property
    def ok(self) -> bool:
        return not self.regressions

    def as_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "current": self.current, "tolerance": self.tolerance,
                "regressions": [c.as_dict() for c in self.regressions],
                "improvements": [c.as_dict() for c in self.improvements],
                "changed": [c.as_dict() for c in self.changed], "within_noise": self.within_noise,
                "not_comparable": [list(k) for k in self.not_comparable],
                "missing": [list(k) for k in self.missing], "new": [list(k) for k in self.new]}


# -- loading ------------------------------------------------------------------------------------------------------
def load_cells(source: str | Path) -> dict[Key, Point]:
    """The cells of a leaderboard JSON file, a results.sqlite file or a run folder, keyed for matching."""
    p = Path(source)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder (expected a leaderboard .json, a results.sqlite or a run "
                        f"folder)")
    if p.is_dir():
        from .data import resolve_db

        return _from_db(resolve_db(p))
    with p.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        return _from_db(p)
    if p.suffix.lower() == ".json" or head.lstrip()[:1] == b"{":
        from .leaderboard import load_leaderboard

        doc = load_leaderboard(p)
        return _from_records(doc["cells"], p)
    raise UserError(f"{p}: neither a leaderboard JSON file nor a results.sqlite database")


def _from_db(db: Path) -> dict[Key, Point]:
    from .data import load_results

    res = load_results(db)
    out: dict[Key, Point] = {}
    for c in res.ok_cells:
        for metric, v in c.metrics.items():
            out[(c.defense_label, c.model_attack_label, c.image_attack_label, c.seed, metric)] = Point(
                v.value, v.low, v.high, v.n, v.higher_is_better)
    return out


def _num(x: Any, where: str) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise UserError(f"{where}: expected a number or null, got {x!r}")
    return float(x)


def _from_records(records: list[Any], path: Path) -> dict[Key, Point]:
    out: dict[Key, Point] = {}
    for i, r in enumerate(records):
        where = f"{path}: cells[{i}]"
        try:
            key = (str(r["defense_label"]), str(r["model_attack_label"]), str(r["image_attack_label"]),
                   int(r["seed"]), str(r["metric"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: needs defense_label, model_attack_label, image_attack_label, seed and "
                            f"metric") from None
        hib = r.get("higher_is_better")
        out[key] = Point(_num(r.get("value"), where), _num(r.get("low"), where), _num(r.get("high"), where),
                         int(r.get("n") or 0), None if hib is None else bool(hib))
    return out


# -- comparing ----------------------------------------------------------------------------------------------------
def compare_cells(baseline: dict[Key, Point], current: dict[Key, Point], tolerance: float = 0.0,
                  baseline_name: str = "baseline", current_name: str = "current") -> Comparison:
    """Classify every matched cell (see the module docstring)."""
    if tolerance < 0:
        raise UserError(f"--tolerance {tolerance}: must be >= 0")
    out = Comparison(baseline_name, current_name, tolerance)
    for key in baseline:
        if key not in current:
            out.missing.append(key)
    for key, cur in current.items():
        base = baseline.get(key)
        if base is None:
            out.new.append(key)
            continue
        if base.value is None or cur.value is None:
            if base.value is not None or cur.value is not None:
                out.not_comparable.append(key)
            continue
        change = Change(key, base, cur)
        disjoint = cur.hi < base.lo or cur.lo > base.hi
        if not disjoint or abs(change.delta) <= tolerance:
            out.within_noise += 1
            continue
        hib = cur.higher_is_better if cur.higher_is_better is not None else base.higher_is_better
        if hib is None:
            out.changed.append(change)
        elif (change.delta > 0) == hib:
            out.improvements.append(change)
        else:
            out.regressions.append(change)
    order = lambda c: -abs(c.delta)  # noqa: E731
    for lst in (out.regressions, out.improvements, out.changed):
        lst.sort(key=order)
    return out


def compare(baseline: str | Path, current: str | Path, tolerance: float = 0.0) -> Comparison:
    """Load two sources and compare them."""
    return compare_cells(load_cells(baseline), load_cells(current), tolerance, str(baseline), str(current))


# -- text ---------------------------------------------------------------------------------------------------------
def _label(key: Key, seeds: bool) -> str:
    d, ma, ia, seed, metric = key
    attack = ia if ma == "none" else f"{ma} | {ia}"
    return f"{d} / {attack}" + (f" / s{seed}" if seeds else "")


def _pt(p: Point) -> str:
    from .leaderboard import fmt

    s = fmt(p.value)
    if p.low is not None and p.high is not None:
        s += f" [{fmt(p.low)}, {fmt(p.high)}]"
    return s


def to_markdown(cmp: Comparison, limit: int = 50) -> str:
    """A Markdown summary: counts, then tables of regressions, improvements and direction-less changes."""
    from .leaderboard import _code, _md, fmt

    keys = [c.key for c in cmp.regressions + cmp.improvements + cmp.changed] + cmp.missing + cmp.new
    seeds = len({k[3] for k in keys}) > 1
    verdict = (f"**{len(cmp.regressions)} regression(s)**" if cmp.regressions else "no regression")
    lines = [f"### MarkBench compare: {verdict}", "",
             f"{_code(cmp.current)} against baseline {_code(cmp.baseline)} (tolerance {cmp.tolerance:g}; a move "
             f"counts when the 95% intervals do not overlap and the change exceeds the tolerance).", "",
             f"{len(cmp.regressions)} regressed, {len(cmp.improvements)} improved, {len(cmp.changed)} changed "
             f"(no direction), {cmp.within_noise} within noise, {len(cmp.missing)} missing, {len(cmp.new)} new, "
             f"{len(cmp.not_comparable)} not comparable."]
    for title, items in (("Regressions", cmp.regressions), ("Improvements", cmp.improvements),
                         ("Changed (metric without a direction)", cmp.changed)):
        if not items:
            continue
        lines += ["", f"#### {title}", "", "| cell | metric | baseline | current | change |",
                  "|:---|:---|---:|---:|---:|"]
        for c in items[:limit]:
            lines.append(f"| {_md(_label(c.key, seeds))} | {_md(c.key[4])} | {_pt(c.baseline)} | {_pt(c.current)} "
                         f"| {'+' if c.delta > 0 else ''}{fmt(c.delta)} |")
        if len(items) > limit:
            lines.append(f"| ... {len(items) - limit} more | | | | |")
    for title, items in (("Missing from the current results", cmp.missing), ("New in the current results", cmp.new),
                         ("Not comparable (a value is missing on one side)", cmp.not_comparable)):
        if not items:
            continue
        cells = sorted({_label(k, seeds) for k in items})
        lines += ["", f"#### {title}", "", ", ".join(_md(c) for c in cells[:limit])
                  + (f", ... {len(cells) - limit} more" if len(cells) > limit else "")
                  + f" ({len(items)} cell-metric pairs)"]
    return "\n".join(lines) + "\n"


def write_json(cmp: Comparison, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cmp.as_dict(), indent=1) + "\n", encoding="utf-8")
