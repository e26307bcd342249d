"""Subcommands ``bench report``, ``bench leaderboard`` and ``bench compare`` (found by :mod:`bench.cli` through the entry-point group ``bench.commands``).

Nothing heavy is imported here: each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

from markbench.cli import ALL_CELLS_HELP, read_cells

EPILOG_REPORT = textwrap.dedent("""\
    examples:
      bench report                                  the report of the run in ./bench.toml's output folder
      bench report --output runs/default            the report of the run in runs/default
      bench report --config configs/my.toml --out my-report.html
    The report is one self-contained HTML file (no network): heatmap, robustness curves, quality vs. robustness,
    image panels and the run's manifest. It reads the results database; it never recomputes a metric.""")

EPILOG_LEADERBOARD = textwrap.dedent("""\
    examples:
      bench leaderboard                             write <output>/leaderboard.json and leaderboard.md
      bench leaderboard --output runs/ci --out-json results/leaderboard.json
      bench leaderboard --metric tpr@0.01 >> "$GITHUB_STEP_SUMMARY"
    The Markdown table also goes to standard output. The JSON schema (schema_version 1) is in docs/reports.md.""")

EPILOG_COMPARE = textwrap.dedent("""\
    examples:
      bench compare results/leaderboard.json runs/ci/leaderboard.json
      bench compare runs/main runs/my-branch --tolerance 0.02
      bench compare old/results.sqlite new/results.sqlite --out-md compare.md
    BASELINE and CURRENT are each a leaderboard JSON file, a results.sqlite file or a run folder. A regression is a
    cell (defence, model attack, image attack, seed, metric) that moved the bad way with non-overlapping 95%
    intervals by more than the tolerance. Exit codes: 0 no regression, 1 regression(s), 2 bad input.""")


def after_run(cfg: Any, console: Any, err: Any) -> None:
    """Called by ``bench run`` when the run is done: write ``<output>/report.html`` (the config's grid)."""
    from markbench.plan import grid_labels

    from .html import render_report

    try:
        report = render_report(cfg.output / "results.sqlite", cfg.output / "report.html", cfg.cache_dir,
                               cells=grid_labels(cfg))
    except Exception as exc:  # a report that cannot render must not hide the run's outcome
        err.print(f"warning: report not written: {exc}", markup=False)
        return
    console.print(f"report: {report}", markup=False)


def add_parsers(sub: Any, cfg_args: Callable[..., None]) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add the report commands to ``bench``'s subparsers; returns ``{command: handler}``."""
    fmt = argparse.RawDescriptionHelpFormatter
    r = sub.add_parser("report", help="render the self-contained HTML report of a run", formatter_class=fmt,
                       description="Render the HTML report of a run's results database.", epilog=EPILOG_REPORT)
    cfg_args(r)
    r.add_argument("--out", default=None, metavar="FILE", help="the HTML file to write (default: <output>/report.html)")
    r.add_argument("--cache", default=None, metavar="DIR",
                   help="artifact cache holding the images (default: run.cache, else <output>/cache)")
    r.add_argument("--all-cells", action="store_true", help=ALL_CELLS_HELP)

    lb = sub.add_parser("leaderboard", help="write the leaderboard (JSON and Markdown) of a run", formatter_class=fmt,
                        description="Rank defences by robustness across the grid, with quality beside it.",
                        epilog=EPILOG_LEADERBOARD)
    cfg_args(lb)
    lb.add_argument("--out-json", default=None, metavar="FILE",
                    help="leaderboard JSON (default: <output>/leaderboard.json)")
    lb.add_argument("--out-md", default=None, metavar="FILE",
                    help="leaderboard Markdown (default: <output>/leaderboard.md)")
    lb.add_argument("--metric", "-m", default=None, help="ranking metric (default: run.primary_metric)")
    lb.add_argument("--quiet", "-q", action="store_true", help="do not print the Markdown table")
    lb.add_argument("--all-cells", action="store_true", help=ALL_CELLS_HELP)

    c = sub.add_parser("compare", help="compare two runs cell by cell; exit 1 on a regression", formatter_class=fmt,
                       description="Compare two leaderboards, results databases or run folders cell by cell.",
                       epilog=EPILOG_COMPARE)
    c.add_argument("baseline", metavar="BASELINE", help="leaderboard .json, results.sqlite or run folder")
    c.add_argument("current", metavar="CURRENT", help="leaderboard .json, results.sqlite or run folder")
    c.add_argument("--tolerance", "-t", type=float, default=0.0, metavar="X",
                   help="absolute change a move must exceed to count (default: 0)")
    c.add_argument("--fail-on-missing", action="store_true",
                   help="also exit 1 when cells of the baseline are missing from the current results")
    c.add_argument("--out-md", default=None, metavar="FILE", help="also write the Markdown summary to FILE")
    c.add_argument("--out-json", default=None, metavar="FILE", help="also write every classified cell as JSON")
    rd = sub.add_parser("readme", help="regenerate the results blocks of README.md and docs/*.md (or --check them)",
                        formatter_class=fmt,
                        description="Rewrite the block between the README's results markers from a leaderboard "
                                    "JSON, and every block '<!-- results:begin source=results/X.json ... -->' of "
                                    "docs/*.md (and of README.md) from the results file it names, so no number in "
                                    "the README or the docs is typed by hand. A docs block may select cells and "
                                    "columns: defenses=a,b model_attacks=... image_attacks=... metrics=m1,m2 "
                                    "(labels), and a view: view=utility (detection against attacker utility at each "
                                    "point of each model attack's sweep: the leaderboard's utility curves), "
                                    "view=threats (the threat-tier matrix), view=threats-verdict (which tier breaks "
                                    "each defence, at what quality) or view=attacks (the image-attack matrix: "
                                    "removal, the attacker's joint success and cost, forgery).",
                        epilog=textwrap.dedent("""\
                            examples:
                              bench readme                              README.md and docs/*.md from results/
                              bench readme --check                      exit 1 if any block is stale (the tests run it)
                              bench readme --leaderboard runs/ci/leaderboard.json --readme README.md

                            a results file for the docs, from a run of a config:
                              bench run --config configs/tree-ring-tiny.toml --output runs/tree-ring
                              bench leaderboard --config configs/tree-ring-tiny.toml --output runs/tree-ring \\
                                  --out-json results/tree-ring-tiny.json"""))
    rd.add_argument("--readme", default="README.md", metavar="FILE", help="the file to update (default: README.md)")
    rd.add_argument("--leaderboard", default="results/leaderboard.json", metavar="FILE",
                    help="the leaderboard JSON (default: results/leaderboard.json, the committed baseline)")
    rd.add_argument("--docs", default="docs", metavar="DIR",
                    help="the folder whose *.md results blocks are regenerated too (default: docs; '' for none)")
    rd.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    return {"report": cmd_report, "leaderboard": cmd_leaderboard, "compare": cmd_compare, "readme": cmd_readme}


def cmd_readme(args: argparse.Namespace) -> int:
    from markbench.errors import UserError

    from .readme import doc_files, update, update_docs

    for path in (args.readme, args.leaderboard):
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
    try:
        fresh = update(args.readme, args.leaderboard, check=args.check)
    except (ValueError, json.JSONDecodeError) as exc:
        raise UserError(f"{args.readme}: {exc}") from None
    docs: dict[Path, bool] = {}
    if args.docs:
        root = Path(args.docs).resolve().parent  # results/ paths in the blocks are relative to the repository
        for doc in doc_files(root):
            try:
                docs[doc] = update_docs(doc, root, check=args.check)
            except (ValueError, json.JSONDecodeError) as exc:
                raise UserError(str(exc)) from None
    if args.check:
        print(f"{args.readme}: results block {'up to date' if fresh else 'STALE: run bench readme'}")
        for doc, ok in docs.items():
            print(f"{doc}: results blocks {'up to date' if ok else 'STALE: run bench readme'}")
        return 0 if fresh and all(docs.values()) else 1
    print(f"{args.readme}: results block {'already up to date' if fresh else 'rewritten'} from {args.leaderboard}")
    for doc, ok in docs.items():
        print(f"{doc}: results blocks {'already up to date' if ok else 'rewritten'}")
    return 0


def _db_and_config(args: argparse.Namespace):
    from markbench.cli import load_config_from_args
    from markbench.errors import UserError

    cfg = load_config_from_args(args, check_output=False)
    db = cfg.output / "results.sqlite"
    if not db.exists():
        raise UserError(f"{db}: no results yet; run 'bench run' with this config (or pass --output RUN_FOLDER)")
    return cfg, db


def cmd_report(args: argparse.Namespace) -> int:
    from .html import render_report

    cfg, db = _db_and_config(args)
    cache = args.cache
    if cache is None and cfg.cache_dir.is_dir():
        cache = cfg.cache_dir
    out = render_report(db, args.out or cfg.output / "report.html", cache, cells=read_cells(cfg, args, db))
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import to_markdown, write_leaderboard

    cfg, db = _db_and_config(args)
    out_json = Path(args.out_json) if args.out_json else cfg.output / "leaderboard.json"
    out_md = Path(args.out_md) if args.out_md else cfg.output / "leaderboard.md"
    board = write_leaderboard(db, out_json, out_md, metric=args.metric, cells=read_cells(cfg, args, db))
    if not args.quiet:
        sys.stdout.write(to_markdown(board))
    print(f"wrote {out_json} and {out_md}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from markbench.errors import UserError

    from .compare import compare, to_markdown, write_json

    if not (args.tolerance >= 0):  # also refuses nan
        raise UserError(f"--tolerance {args.tolerance}: must be a number >= 0")
    result = compare(args.baseline, args.current, args.tolerance)
    text = to_markdown(result)
    sys.stdout.write(text)
    if args.out_md:
        p = Path(args.out_md)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    if args.out_json:
        write_json(result, args.out_json)
    if result.regressions:
        return 1
    if args.fail_on_missing and result.missing:
        print(f"{len(result.missing)} baseline cell-metric pair(s) missing from {args.current}", file=sys.stderr)
        return 1
    return 0
