"""The results database: ``<output>/results.sqlite``.

Tables: ``runs`` (one row per invocation: config, versions, git hash), ``cells`` (one row per cell: status,
parameters, timings, costs, error and traceback), ``results`` (one row per cell and metric: value, interval, N, note),
``samples`` (the per-image values behind a mean or rate, where the metric gives them: for combining seeds by a
hierarchical bootstrap; a database written before this table existed simply has none; a two-sample statistic's
negatives' values, ROC AUC's, under the metric's name with :data:`NEGATIVE_SAMPLES` appended).
The view ``results_full`` joins them into one row per cell and metric with everything that made the number. Every
cell is committed as soon as it is measured, so an interrupted run loses nothing already computed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 2
#: appended to a metric's name in the ``samples`` table for its negatives' per-image values (``Measurement.samples_neg``)
NEGATIVE_SAMPLES = ":negatives"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started REAL, finished REAL, status TEXT, command TEXT, config_path TEXT,
    config_json TEXT, versions_json TEXT, git_hash TEXT, summary_json TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, run_id TEXT, label TEXT, seed INTEGER,
    defense TEXT, defense_label TEXT, defense_params TEXT, defense_version TEXT, defense_origin TEXT,
    model_attack TEXT, model_attack_label TEXT, model_attack_params TEXT, model_attack_version TEXT,
    model_attack_origin TEXT,
    image_attack TEXT, image_attack_label TEXT, image_attack_params TEXT, image_attack_version TEXT,
    image_attack_origin TEXT,
    negatives TEXT, n_images INTEGER, status TEXT, error TEXT, traceback TEXT,
    timings_json TEXT, costs_json TEXT, stage_keys_json TEXT, updated REAL, threat_json TEXT, axis TEXT
);
CREATE TABLE IF NOT EXISTS results (
    cell_id TEXT, metric TEXT, value REAL, low REAL, high REAL, n INTEGER, note TEXT, higher_is_better INTEGER,
    PRIMARY KEY (cell_id, metric)
);
CREATE TABLE IF NOT EXISTS samples (
    cell_id TEXT, metric TEXT, values_json TEXT, PRIMARY KEY (cell_id, metric)
);
CREATE VIEW IF NOT EXISTS results_full AS
    SELECT c.label AS cell, c.defense, c.defense_label, c.model_attack, c.model_attack_label, c.image_attack,
           c.image_attack_label, c.seed, r.metric, r.value, r.low, r.high, r.n, r.note, r.higher_is_better,
           c.negatives, c.status, c.defense_params, c.model_attack_params, c.image_attack_params,
           c.defense_version, c.model_attack_version, c.image_attack_version, c.defense_origin,
           c.model_attack_origin, c.image_attack_origin,
           c.timings_json, c.costs_json, u.versions_json, u.git_hash, c.run_id, c.cell_id, c.updated,
           c.threat_json, c.axis
    FROM results r JOIN cells c ON r.cell_id = c.cell_id LEFT JOIN runs u ON c.run_id = u.run_id;
"""


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.path.is_file():
            from .errors import UserError

            raise UserError(f"{self.path}: is not a file; the results database must be a SQLite file (move the "
                            "folder away, or use another run.output)")
        try:
            self.con = sqlite3.connect(str(self.path), timeout=30)
        except sqlite3.Error as exc:
            from .errors import UserError

            raise UserError(f"{self.path}: the results database cannot be opened ({exc})") from None
        try:
            found = self.con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            if "no such table" not in str(exc):
                self.con.close()
                from .errors import UserError

                raise UserError(f"{self.path}: not a MarkBench results database ({exc})") from None
            found = None
            tables = [r[0] for r in self.con.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'")]
            if tables:  # another program's database: never write into it
                self.con.close()
                from .errors import UserError

                shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
                raise UserError(f"{self.path}: not a MarkBench results database (it holds the tables {shown} and no "
                                f"'meta' table); use another run.output") from None
        if found is not None and int(found[0]) != SCHEMA_VERSION:
            self.con.close()
            from .errors import UserError

            raise UserError(f"{self.path}: results database has schema version {found[0]}, this MarkBench writes "
                            f"version {SCHEMA_VERSION}; use a new run.output folder (the artifact cache can stay)")
        self.con.executescript(_SCHEMA)
        columns = {r[1] for r in self.con.execute("PRAGMA table_info(cells)")}
        if "threat_json" not in columns:  # a database written before the threat model was recorded
            self.con.execute("ALTER TABLE cells ADD COLUMN threat_json TEXT")
        if "axis" not in columns:  # written before forgery cells existed: every cell is a removal cell
            self.con.execute("ALTER TABLE cells ADD COLUMN axis TEXT")
        if "axis" not in {r[1] for r in self.con.execute("PRAGMA table_info(results_full)")}:
            # the view of an older database: made again with the axis (a view holds no data)
            self.con.execute("DROP VIEW IF EXISTS results_full")
            self.con.executescript(_SCHEMA)
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self.con.commit()

    def close(self) -> None:
        self.con.close()

    # -- runs -----------------------------------------------------------------------------------------------
    def start_run(self, run_id: str, command: str, config_path: str, config: dict[str, Any],
                  versions: dict[str, str], git_hash: str) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?)",
            (run_id, time.time(), None, "running", command, config_path, json.dumps(config, default=str),
             json.dumps(versions), git_hash, None),
        )
        self.con.commit()

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        self.con.execute("UPDATE runs SET finished=?, status=?, summary_json=? WHERE run_id=?",
                         (time.time(), status, json.dumps(summary, default=str), run_id))
        self.con.commit()

    # -- cells ----------------------------------------------------------------------------------------------
    def cell_status(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT cell_id, status FROM cells"))

    def write_cell(self, run_id: str, cell, status: str, measurements: Iterable = (), *, n_images: int,
                   negatives: str, error: str = "", traceback: str = "", timings: dict | None = None,
                   costs: dict | None = None, threat: dict | None = None) -> None:
        """Write one cell and its measurements in a single transaction.

        ``threat``: the defence's threat setting and whether this cell's model attack lies outside it
        (:func:`bench.plugins.threat_scope`).
        """
        measurements = list(measurements)

        def spec(s, label=None):
            return (s.name, label or s.label, json.dumps(s.param_dict, sort_keys=True), s.version)

        with self.con:
            self.con.execute("DELETE FROM results WHERE cell_id=?", (cell.key,))
            self.con.execute("DELETE FROM samples WHERE cell_id=?", (cell.key,))
            self.con.execute(
                "INSERT OR REPLACE INTO cells VALUES (?,?,?,?, ?,?,?,?,?, ?,?,?,?,?, ?,?,?,?,?, ?,?,?,?,?, ?,?,?,?,?,?)",
                (cell.key, run_id, cell.label, cell.seed, *spec(cell.defense, cell.defense_label), cell.defense.origin,
                 *spec(cell.model_attack), cell.model_attack.origin, *spec(cell.image_attack), cell.image_attack.origin,
                 negatives, n_images, status, error, traceback,
                 json.dumps(timings or {}), json.dumps(costs or {}, default=str),
                 json.dumps(list(cell.stage_keys())), time.time(), json.dumps(threat or {}),
                 getattr(cell, "axis", "removal")),
            )
            self.con.executemany(
                "INSERT INTO results VALUES (?,?,?,?,?,?,?,?)",
                [(cell.key, m.name, _num(m.value), _num(m.low), _num(m.high), int(m.n), m.note,
                  None if m.higher_is_better is None else int(m.higher_is_better)) for m in measurements],
            )
            self.con.executemany(
                "INSERT INTO samples VALUES (?,?,?)",
                [(cell.key, m.name + suffix, json.dumps([round(float(v), 6) for v in values]))
                 for m in measurements
                 for suffix, values in (("", getattr(m, "samples", None)),
                                        (NEGATIVE_SAMPLES, getattr(m, "samples_neg", None)))
                 if values is not None],
            )

    def relabel(self, cell) -> bool:
        """Give a finished cell the labels the current config gives it; ``True`` if any changed.

        Labels are display names, not part of a cell's key: a config that renames an entry (``label = ...``) or stops
        sweeping one of its parameters finds its cells done, and the readers, which keep the cells whose labels the
        config's grid has, must then find them under the new names rather than hide them.
        """
        new = (cell.label, cell.defense_label or cell.defense.label, cell.model_attack.label, cell.image_attack.label)
        with self.con:
            cur = self.con.execute(
                "UPDATE cells SET label=?, defense_label=?, model_attack_label=?, image_attack_label=? "
                "WHERE cell_id=? AND (label IS NOT ? OR defense_label IS NOT ? OR model_attack_label IS NOT ? "
                "OR image_attack_label IS NOT ?)", (*new, cell.key, *new))
        return cur.rowcount > 0

    # -- reading --------------------------------------------------------------------------------------------
    def dataframe(self, cell_ids: Iterable[str] | None = None):
        """``results_full`` as a pandas DataFrame (optionally only some cells)."""
        import pandas as pd

        df = pd.read_sql_query("SELECT * FROM results_full ORDER BY updated, metric", self.con)
        if cell_ids is not None:
            df = df[df["cell_id"].isin(set(cell_ids))]
        return df

    def cells_frame(self):
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM cells ORDER BY updated", self.con)

    def runs_frame(self):
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM runs ORDER BY started", self.con)


def _num(x: Any) -> float | None:
    if x is None:
        return None
    return float(x)


def export(df, out: str | Path) -> Path:
    """Write a results frame to ``.csv`` or ``.parquet`` (by the file's suffix)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        df.to_csv(out, index=False)
    elif out.suffix in (".parquet", ".pq"):
        df.to_parquet(out, index=False)
    elif out.suffix == ".json":
        df.to_json(out, orient="records", indent=1)
    else:
        from .errors import UserError

        raise UserError(f"--to {str(out)!r}: unknown format '{out.suffix}'; allowed: .csv, .parquet, .json")
    return out
