"""The ``bench`` command line.

User errors (bad config, unknown plugin, missing folder ...) print one sentence and exit with code 2; ``--debug``
shows the traceback. A run whose cells partly failed exits with code 1 after a summary.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from .errors import BenchError, UserError

EPILOG_MAIN = """\
examples:
  bench run                                  run the grid in ./bench.toml (or the shipped default)
  bench run --config configs/my.toml --only 'dwtdct/*'
  bench run --set run.num_images=8 --dry-run show the plan with an override, compute nothing
  bench show --metric bit_accuracy           the results matrix of the last run
  bench ls defenses                          what can be benchmarked, with parameters
  bench validate configs/my.toml             check a config without running it
  bench cache du                             how big the artifact cache is (verify, prune: bench cache -h)
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (``error: ...``, exit code 2), like every other user error; the
    usage itself is one ``--help`` away. Sub-command parsers are of this class too (argparse makes them so)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {one_line(message)}; see '{self.prog} --help'\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bench", description="MarkBench: robustness of watermarks in text-to-image diffusion models.",
        epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cfg_args(sp, positional: bool = False):
        if positional:
            sp.add_argument("config", nargs="?", default=None, help="config file (default: ./bench.toml)")
        else:
            sp.add_argument("--config", "-c", default=None, help="config file (default: ./bench.toml)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable): SECTION.KEY, e.g. run.num_images=8, or a "
                             "plugin parameter PLUGINS.LABEL.PARAM, e.g. defenses.hidden.steps=100 (LABEL: the "
                             "entry's label, else its name)")
        sp.add_argument("--output", "-o", default=None, help="output folder (overrides run.output)")
        sp.add_argument("--allow-pickle", action="store_true",
                        help="let the model load pickle weights (.bin/.ckpt/.pt), which can run code; sets "
                             "model.allow_pickle = true (default: safetensors only)")

    r = sub.add_parser("run", help="run the grid of a config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Cross defences with attacks and store a results matrix.",
                       epilog=textwrap.dedent("""\
                           examples:
                             bench run
                             bench run --config configs/finetune.toml --only 'dwtdct*jpeg*'
                             bench run --rerun-failed
                             bench run --dry-run --set run.seeds=[0,1]
                             bench run --set defenses.hidden.steps=100 --set run.device=cuda
                           Re-running the same command resumes: finished cells and cached stages are kept."""))
    cfg_args(r)
    r.add_argument("--dry-run", action="store_true", help="print the plan (cells, stages, cache hits) and stop")
    r.add_argument("--only", default=None, metavar="PATTERN",
                   help="only cells whose label 'defence/model_attack/image_attack/sN' matches (glob, or substring)")
    r.add_argument("--rerun-failed", action="store_true", help="retry cells that failed in an earlier run")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--executor", default=None, metavar="{local,ray}",
                   help="where stages run: 'local' (this process, the default) or 'ray' (overrides run.executor)")
    r.add_argument("--address", default=None, metavar="ADDRESS",
                   help="with --executor ray: the cluster to join, 'auto' or 'ray://HEAD:10001' (default: start a "
                        "local Ray; overrides run.address)")

    ls = sub.add_parser("ls", help="list plugins with their parameters, and the worlds",
                        epilog="examples:\n  bench ls\n  bench ls attacks\n  bench ls defenses -v\n"
                               "  bench ls worlds             models, prompt sets and datasets ('<world>:<name>')",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("kind", nargs="?", default="all",
                    choices=("all", "defenses", "attacks", "image-attacks", "model-attacks", "metrics", "worlds"))
    ls.add_argument("-v", "--verbose", action="store_true", help="full docstrings")

    v = sub.add_parser("validate", help="check a config file without running it",
                       epilog="examples:\n  bench validate configs/my.toml\n"
                              "  bench validate configs/sleepermark-sd.toml --no-model   a config for a GPU machine",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg_args(v, positional=True)
    v.add_argument("--no-model", action="store_true",
                   help="do not require the model's weights here (a config written for another machine); every "
                        "other check still runs")

    s = sub.add_parser("show", help="print the results matrix (defences x attacks)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  bench show\n  bench show --metric bit_accuracy\n"
                              "  bench show --format csv > matrix.csv")
    cfg_args(s)
    s.add_argument("--metric", "-m", default=None, help="metric to show (default: run.primary_metric)")
    s.add_argument("--format", "-f", choices=("table", "csv", "json"), default="table")
    s.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="attacks as rows (default: automatic, when there are many attack columns)")
    s.add_argument("--all-cells", action="store_true", help=ALL_CELLS_HELP)

    e = sub.add_parser("export", help="export all results (one row per cell and metric) to CSV, Parquet or JSON",
                       epilog="examples:\n  bench export --to results.csv\n  bench export --to results.parquet",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg_args(e)
    e.add_argument("--to", required=True, help="output file: .csv, .parquet or .json")
    e.add_argument("--all-cells", action="store_true", help=ALL_CELLS_HELP)

    # Command groups owned by other packages: each module's add_parsers(sub, cfg_args) returns {command: handler}.
    p.set_defaults(_extra={})
    extra: dict = {}
    for module in command_modules():
        mod = _command_module(module)
        if mod is None:
            continue
        try:
            extra.update(mod.add_parsers(sub, cfg_args))
        except (Exception, SystemExit) as exc:  # a third-party command group must not break every other command
            _command_module_warning(module, f"its add_parsers failed ({type(exc).__name__}: {one_line(exc)[:160]})")
    p.set_defaults(_extra=extra)
    return p


#: command modules already reported as broken (warned once per process)
_BROKEN_COMMAND_MODULES: set[str] = set()


def _command_module(module: str):
    """Import a command-group module; one that cannot be imported is reported once (naming its package) and left
    out, so a broken third-party package never breaks ``bench ls`` or ``bench run``."""
    try:
        return importlib.import_module(module)
    except (Exception, SystemExit) as exc:  # a sys.exit() at import must not end every command silently
        if module in _CORE_COMMAND_MODULES:
            raise
        _command_module_warning(module, f"could not be imported ({type(exc).__name__}: {one_line(exc)[:160]})")
        return None


def _command_module_warning(module: str, why: str) -> None:
    if module in _BROKEN_COMMAND_MODULES:
        return
    _BROKEN_COMMAND_MODULES.add(module)
    from importlib.metadata import entry_points

    owners = [f"'{ep.name} = {ep.value}' of {ep.dist.name} {ep.dist.version}" if getattr(ep, "dist", None)
              else f"'{ep.name} = {ep.value}'" for ep in entry_points(group="bench.commands") if ep.value == module]
    where = f"entry point {owners[0]} (group bench.commands)" if owners else f"command module {module!r}"
    print(f"warning: ignoring {where}: {why}", file=sys.stderr)


#: the core's own command groups (``bench cache``)
_CORE_COMMAND_MODULES = ("markbench.cache_cli",)


def command_modules() -> list[str]:
    """Modules that add command groups (lightweight imports only: no torch/diffusers at module top).

    The core names none: they come from the entry-point group ``bench.commands`` (this package's ``reports.cli``:
    report, leaderboard, compare) and from the worlds (:meth:`bench.world.World.cli_module`; ``bench zoo``). A module
    may also define ``after_run(cfg, console, err)``, called when ``bench run`` finishes (the HTML report).
    """
    from importlib.metadata import entry_points

    from .world import all_worlds

    out = list(_CORE_COMMAND_MODULES) + [ep.value for ep in entry_points(group="bench.commands")]
    out += [m for w in all_worlds() if (m := w.cli_module())]
    return list(dict.fromkeys(out))


def _after_run_hooks() -> list:
    hooks = []
    for module in command_modules():
        hook = getattr(_command_module(module), "after_run", None)
        if hook is not None:
            hooks.append(hook)
    return hooks


def main(argv: Sequence[str] | None = None) -> int:
    _plugin_warnings_as_lines()
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line printed by _Parser.error)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"run": cmd_run, "ls": cmd_ls, "validate": cmd_validate, "show": cmd_show, "export": cmd_export,
                **args._extra}
    try:
        return handlers[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except BenchError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished cells are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bench show --format csv | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _plugin_warnings_as_lines() -> None:
    """A third-party plugin that fails to load is reported as one line ``warning: ...`` on stderr."""
    import warnings

    from .registry import PluginLoadWarning

    shown = warnings.showwarning
    if getattr(shown, "_bench", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PluginLoadWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show._bench = True  # type: ignore[attr-defined]
    warnings.showwarning = show


#: the longest error line printed (values echoed in messages are cut before; this is the last guard)
MAX_MESSAGE = 1000


def one_line(exc: BaseException) -> str:
    """An error message as one line of sane length: whitespace runs become one space, overlong words are cut."""
    words = [w if len(w) <= 200 else w[:200] + "..." for w in str(exc).split()]
    text = " ".join(words)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def load_config_from_args(args, check_output: bool = True):
    """The config named by ``--config``/``--set``/``--output`` (shared by every command that reads one)."""
    return _load(args, check_output)


def _load(args, check_output: bool = True):
    from .config import load_config, parse_override

    overrides = dict(parse_override(o) for o in args.overrides)
    if args.output is not None:  # --output "" is refused by the config's check, not ignored
        overrides["run.output"] = args.output
    if getattr(args, "allow_pickle", False):
        overrides["model.allow_pickle"] = True
    for option in ("executor", "address"):  # `bench run --executor ray --address auto`
        if getattr(args, option, None) is not None:
            overrides[f"run.{option}"] = getattr(args, option)
    return load_config(args.config, overrides, check_output=check_output)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


# ------------------------------------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .progress import Progress
    from .runner import Runner

    from .preflight import preflight

    cfg = _load(args)
    preflight(cfg)
    console = _console()
    err = _console(stderr=True)
    show_bars = not args.no_progress and err.is_terminal
    text_log = None if show_bars else (lambda m: err.print(m, markup=False, soft_wrap=True))
    runner = Runner(cfg, progress=Progress(enabled=show_bars, console=err, log=text_log),
                    log=text_log or (lambda m: None),
                    warn=lambda m: err.print(m, markup=False, soft_wrap=True))
    cells = runner.plan.select(args.only)
    if args.only and not cells:
        raise UserError(f"--only {args.only!r} matches no cell; labels look like "
                        f"'{runner.plan.cells[0].label}'")
    if args.dry_run:
        _print_plan(runner, cells, console)
        return 0
    summary = runner.run(only=args.only, rerun_failed=args.rerun_failed,
                         command="bench " + " ".join(sys.argv[1:]))
    console.print(f"[bold]{summary.cells_ok}[/] cells computed, {summary.cells_skipped} already done, "
                  f"{len(summary.cells_failed)} failed; stages run: "
                  + (", ".join(f"{k} {v}" for k, v in sorted(summary.stages_run.items())) or "none")
                  + f"; cached stages reused: {summary.stages_cached}"
                  + (f"; damaged cache entries quarantined and recomputed: {len(summary.healed)}"
                     if summary.healed else "")
                  + f"; {summary.seconds:.1f} s", soft_wrap=True)
    _print_matrix(cfg, None, "table", console)
    for hook in _after_run_hooks():  # e.g. reports.cli.after_run writes report.html
        try:
            hook(cfg, console, err)
        except Exception as exc:  # a report that cannot render must not hide the run's outcome
            err.print(f"warning: {getattr(hook, '__module__', 'a hook')}: {exc}", markup=False)
    if summary.cells_failed:
        console.print(f"[red]{len(summary.cells_failed)} cell(s) failed:[/]")
        for label, error in summary.cells_failed:
            console.print(f"  {label}: {error}", markup=False, soft_wrap=True)
        console.print(f"tracebacks: sqlite3 {cfg.output / 'results.sqlite'} "
                      "\"select label, traceback from cells where status='failed'\"", markup=False)
        return 1
    console.print(f"results: {cfg.output / 'results.sqlite'}", markup=False)
    return 0


def _print_plan(runner, cells, console) -> None:
    stages = runner.plan.closure(cells)
    by_kind: dict[str, list[int]] = {}
    for s in stages:
        cached = s.kind == "base" or runner.artifacts.exists(s.key)
        entry = by_kind.setdefault(s.kind, [0, 0])
        entry[0] += 1
        entry[1] += int(cached)
    console.print(f"{len(cells)} cells, {len(stages)} stages")
    for kind, (n, cached) in by_kind.items():
        console.print(f"  {kind:15s} {n:4d} stages, {cached:4d} cached, {n - cached:4d} to run")
    for c in cells:
        console.print(f"  {c.label}", markup=False)


def cmd_validate(args) -> int:
    from .plan import build_plan

    from .preflight import preflight

    cfg = _load(args)
    preflight(cfg, model=not args.no_model)  # first: a plugin's bad parameter is refused naming the config file
    plan = build_plan(cfg)
    from .plan import attack_runs

    runs = len(attack_runs(cfg))
    repeated = f" ({runs} runs with the attack seeds)" if runs != len(cfg.model_attacks) else ""
    print(f"{cfg.path}: ok: {len(cfg.defenses)} defences x {len(cfg.model_attacks)} model attacks{repeated} x "
          f"{len(cfg.image_attacks)} image attacks x {len(cfg.run.seeds)} seed(s) = {len(plan.cells)} cells, "
          f"{len(plan.stages)} stages, {cfg.run.num_images} images each")
    return 0


def _ls_worlds(console, verbose: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .world import worlds

    table = Table(title="worlds", title_justify="left")
    for col in ("name", "what", "models (model.builtin)", "prompt sets / datasets ('<world>:<name>')"):
        table.add_column(col, style="bold" if col == "name" else None)
    for name in worlds.names():
        from .world import get_world

        w = get_world(name)
        what = (w.__doc__ or "").strip() if verbose else (w.description or (w.__doc__ or "").strip().split("\n")[0])
        origin = worlds.origin(name)
        if origin != "markbench":
            what += f" [from {origin}]"
        sets = [f"{name}:{s}" for s in w.prompt_sets()]
        data = [f"{name}:{d}" for d in w.datasets()]
        models = list(w.models()) + [f"{a} (autoencoder)" for a in w.autoencoders()]  # attacker models it ships
        table.add_row(name, escape(what), "\n".join(models) or "-",
                      escape("prompts: " + (", ".join(sets) or "-") + "\ndatasets: " + (", ".join(data) or "-")))
    console.print(table)


def cmd_ls(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .params import describe
    from .registries import REGISTRIES

    if args.kind == "worlds":
        _ls_worlds(_console(), args.verbose)
        return 0

    kinds = {"all": ("defenses", "image_attacks", "model_attacks", "metrics"),
             "defenses": ("defenses",), "attacks": ("image_attacks", "model_attacks"),
             "image-attacks": ("image_attacks",), "model-attacks": ("model_attacks",),
             "metrics": ("metrics",)}[args.kind]
    console = _console()
    for kind in kinds:
        reg = REGISTRIES[kind]
        table = Table(title=kind.replace("_", " "), show_lines=False, title_justify="left")
        table.add_column("name", style="bold")
        if kind == "defenses":
            table.add_column("protects")  # the threat setting: api, weights or both
        table.add_column("what")
        table.add_column("parameters (default; allowed)")
        for name in reg.names():
            info = reg.info(name)  # read from the source for built-ins: nothing is imported
            what = info.doc if args.verbose else (info.doc.splitlines()[0] if info.doc else "")
            if kind == "model_attacks" and args.verbose:
                what += _threat_model_text(dict(info.extra))
            if info.origin != "markbench":  # first, so a narrow table cannot cut it off
                what = f"[from {info.origin}] {what}"
            params = "\n".join(d.line for d in describe(info.params))
            setting = (str(dict(info.extra).get("threat", "-")),) if kind == "defenses" else ()
            table.add_row(escape(name), *setting, escape(what), escape(params) or "-")
        console.print(table)
    if args.kind == "all":
        _ls_worlds(console, args.verbose)
    return 0


def _threat_model_text(attrs: dict) -> str:
    """What a model attack assumes the attacker has, its goal, and when it exceeds the threat model (bench ls -v).
    ``attrs``: the class attributes the scan read (:data:`bench.discovery.LISTED_ATTRS`), so nothing is imported."""
    has = attrs.get("attacker_has") or "not stated"
    goal = {"downstream": "learn its dataset (utility: the new style or subject recognised)",
            "compression": "a cheaper model (utility: the quality kept)"}.get(attrs.get("goal", ""),
                                                                             "remove the mark (quality kept)")
    if attrs.get("identity", False):
        goal = "none (the unattacked model)"
    tier = attrs.get("tier") or "blind"
    tiers = {"blind": "blind (knows nothing of the defence)",
             "method_known": "method known (knows which watermark is used and how, not its secrets)",
             "trigger_known": "trigger known (is given the defence's trigger, never its key or decoder)"}
    out = f"\nAttacker has: {has}.\nAttacker's goal: {goal}.\nThreat tier: {tiers.get(tier, tier)}."
    if attrs.get("serves_prompts", False):
        out += "\nAttacks the suspect service: its weights stay, every prompt is rewritten before sampling."
    beyond = attrs.get("beyond_threat_model") or {}
    if beyond:
        cond = ", ".join(f"{k} = {v!r}" for k, v in beyond.items())
        out += f"\nStronger than the threat model when {cond}."
    return out


#: ``--all-cells`` (show, export, report, leaderboard)
ALL_CELLS_HELP = ("also read the database's cells that the config's grid no longer has (left by an earlier version of "
                  "the config in the same output folder); default: only the config's grid, when a config names the "
                  "database (--config, or no --output); every cell when only --output names it")


def read_cells(cfg, args, db) -> set[str] | None:
    """The cell labels a reader of the results database ``db`` keeps (show, export, report, leaderboard): the
    config's grid now (:func:`plan.grid_cells`, planned once) when the config names the database (``--config``
    given, or its own ``run.output``), so that cells an earlier version of the config left there stay out, saying on
    stderr when some of them were computed with other settings (:func:`stale_note`); ``None`` (every cell) with
    ``--all-cells``, or when only ``--output`` names a run folder (the default config is not that run's)."""
    from .plan import grid_cells

    if getattr(args, "all_cells", False) or (getattr(args, "output", None) and not getattr(args, "config", None)):
        return None
    planned = grid_cells(cfg)
    note = stale_note(planned, cfg.path, db)
    if note:
        print(note, file=sys.stderr)
    return set(planned)


def stale_note(planned: dict[str, str], config: str, db) -> str | None:
    """A sentence when cells the readers show under the config's labels (``planned``: label -> cell key) were
    computed with other settings than the config has now (a changed model, steps, image count or prompts keeps a
    cell's label but not its key) and not yet recomputed; ``None`` when every shown cell is current."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            latest = dict(con.execute("SELECT label, cell_id FROM cells ORDER BY updated, rowid"))  # the last wins
        finally:
            con.close()
    except sqlite3.Error:
        return None
    stale = sorted(label for label, key in latest.items() if label in planned and planned[label] != key)
    if not stale:
        return None
    return (f"note: {len(stale)} of the {len(planned)} cells of {config or 'the config'} in {db} were computed "
            f"with other settings than the config has now (e.g. {stale[0]}) and are shown as they were; "
            f"'bench run' with this config recomputes them")


def _grid_frame(cfg, cells: set[str] | None):
    """The results frame of the config's database, only the cells labelled ``cells`` (all if ``None``)."""
    from .store import ResultStore

    store = ResultStore(cfg.output / "results.sqlite")
    try:
        df = store.dataframe()
    finally:
        store.close()
    return df if cells is None or df.empty else df[df["cell"].isin(cells)]


def _results(args):
    cfg = _load(args, check_output=False)
    db = cfg.output / "results.sqlite"
    if not db.exists():
        raise UserError(f"{db}: no results yet; run 'bench run' with this config first")
    return cfg, _grid_frame(cfg, read_cells(cfg, args, db))


def cmd_show(args) -> int:
    cfg, df = _results(args)
    _print_matrix(cfg, args.metric, args.format, _console(), transpose=args.transpose, df=df)
    return 0


def cmd_export(args) -> int:
    from .store import export

    _, df = _results(args)
    out = export(df, args.to)
    print(f"wrote {len(df)} rows to {out}")
    return 0


def matrix(df, metric: str):
    """Defences x attacks for one metric: a frame of formatted strings and one of values."""
    sub = df[(df["metric"] == metric) & (df["status"] == "ok")].copy()
    if sub.empty:
        return None
    multi_ma = sub["model_attack_label"].nunique() > 1
    tiers = [_tier(t) for t in sub["threat_json"]] if "threat_json" in sub else [""] * len(sub)
    # the threat tier of a model attack that knows more than nothing of the defence, e.g. "unlearn <trigger_known>"
    ma_label = sub["model_attack_label"] + [f" <{t}>" if t and t != "blind" else "" for t in tiers]
    sub["column"] = (ma_label + " | " if multi_ma else "") + sub["image_attack_label"]
    if "axis" in sub:  # forgery cells (false positives of forged clean images) are columns of their own, last
        forged = sub["axis"].fillna("removal") == "forgery"
        sub["column"] = sub["column"].where(~forged, "forgery: " + sub["column"])
        sub = sub.loc[list(sub.index[~forged]) + list(sub.index[forged])]
    multi_seed = sub["seed"].nunique() > 1
    sub["row"] = sub["defense_label"] + (" s" + sub["seed"].astype(str) if multi_seed else "")
    sub = sub.drop_duplicates(["row", "column"], keep="last")
    sub["outside"] = [_outside(t) for t in sub["threat_json"]] if "threat_json" in sub else False
    sub["stronger"] = ([_stronger(a, p) for a, p in zip(sub["model_attack"], sub["model_attack_params"])]
                       if "model_attack_params" in sub else False)
    order_cols = list(dict.fromkeys(sub["column"]))
    order_rows = list(dict.fromkeys(sub["row"]))
    return sub, order_rows, order_cols


OUTSIDE_MARK = "\u2020"  # dagger: a cell outside the defence's threat model


def _outside(threat_json) -> bool:
    if not isinstance(threat_json, str) or not threat_json:
        return False
    return bool(json.loads(threat_json).get("outside", False))


def _stronger(model_attack, params_json) -> bool:
    """Whether a stored cell's model attack assumes more than its threat model (its declared
    ``beyond_threat_model``, :func:`bench.registries.exceeds_threat_model`)."""
    from .registries import exceeds_threat_model

    try:
        params = json.loads(params_json) if isinstance(params_json, str) and params_json else {}
    except ValueError:
        params = {}
    return exceeds_threat_model(model_attack if isinstance(model_attack, str) else "", params)


def _tier(threat_json) -> str:
    """The model attack's threat tier stored with a cell (``blind``, ``method_known``, ``trigger_known``; ``""`` for
    no model attack or a result stored before tiers were recorded)."""
    if not isinstance(threat_json, str) or not threat_json:
        return ""
    return str(json.loads(threat_json).get("tier", ""))


def _fmt_cell(r, with_n: bool = True) -> str:
    v = r["value"]
    if v is None or v != v:
        return "-"
    s = f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
    if r["low"] is not None and r["low"] == r["low"] and r["high"] is not None and r["high"] == r["high"]:
        s += f" [{r['low']:.2f},{r['high']:.2f}]"
    return s + (f" n={int(r['n'])}" if with_n else "")


def _print_matrix(cfg, metric: str | None, fmt: str, console, transpose: bool | None = None, df=None) -> None:
    db = cfg.output / "results.sqlite"
    if df is None:
        if not db.exists():
            return
        from .plan import grid_labels

        df = _grid_frame(cfg, grid_labels(cfg))
    asked, metric = metric, metric or cfg.run.primary_metric
    available = sorted(df["metric"].unique()) if not df.empty else []
    if metric not in available and asked is None and not df.empty:
        from .config import shown_metric

        shown = shown_metric(metric, available)
        if shown is not None:  # the config's ranking metric, not the user's --metric: show what the results have
            console.print(f"note: the run's primary metric {metric!r} is not in its results (no analytic threshold "
                          f"for these defences); showing {shown!r} (another: --metric)")
            metric = shown
    if metric not in available:
        if df.empty:
            console.print("no results yet")
            return
        from .registry import suggest

        raise UserError(f"--metric {metric!r}: no such metric in the results{suggest(metric, available)}; "
                        f"available: {', '.join(available)}")
    sub, rows, cols = matrix(df, metric)
    from .registries import STRONGER_LEGEND, STRONGER_MARK

    if fmt in ("csv", "json"):
        table = {row: {col: None for col in cols} for row in rows}
        for _, r in sub.iterrows():
            table[r["row"]][r["column"]] = {"value": r["value"], "low": r["low"], "high": r["high"],
                                            "n": int(r["n"]), "note": r["note"],
                                            "outside_threat_model": bool(r["outside"]),
                                            "stronger_than_threat_model": bool(r["stronger"])}
        if fmt == "json":
            print(json.dumps({"metric": metric, "rows": rows, "columns": cols, "cells": table}, indent=1))
        else:
            import csv

            w = csv.writer(sys.stdout)
            w.writerow(["defense", "attack", "metric", "value", "low", "high", "n", "outside_threat_model",
                        "stronger_than_threat_model"])
            for row in rows:
                for col in cols:
                    c = table[row][col]
                    if c is not None:
                        w.writerow([row, col, metric, c["value"], c["low"], c["high"], c["n"],
                                    int(c["outside_threat_model"]), int(c["stronger_than_threat_model"])])
        return
    from rich.markup import escape
    from rich.table import Table

    ns = set(int(n) for n in sub["n"])
    uniform_n = len(ns) == 1
    cells = {(r["row"], r["column"]): _fmt_cell(r, with_n=not uniform_n)
             + (f" {OUTSIDE_MARK}" if r["outside"] else "") + (f" {STRONGER_MARK}" if r["stronger"] else "")
             for _, r in sub.iterrows()}
    # defences x attacks; with many attack columns the table is shown with attacks as rows so it fits a terminal
    flip = transpose if transpose is not None else len(cols) > max(4, len(rows))
    n_text = f"N={ns.pop()}" if uniform_n else "N per cell"
    t = Table(title=f"{metric}: value [95% interval], {n_text}  ({db})", title_justify="left")
    if flip:
        t.add_column("attack \\ defence", style="bold", no_wrap=True)
        for row in rows:
            t.add_column(escape(row))  # labels like "wdm[no_trigger]" are not rich markup
        for col in cols:
            t.add_row(escape(col), *[cells.get((row, col), "") for row in rows])
    else:
        t.add_column("defence \\ attack", style="bold")
        for col in cols:
            t.add_column(escape(col), overflow="fold")
        for row in rows:
            t.add_row(escape(row), *[cells.get((row, col), "") for col in cols])
    console.print(t)
    if sub["outside"].any():
        console.print(f"{OUTSIDE_MARK} outside the defence's threat model: a model attack (it needs the released "
                      "weights) on a defence that protects only API-served models; scored, but not a robustness "
                      "claim of that defence", markup=False)
    if sub["stronger"].any():
        console.print(STRONGER_LEGEND, markup=False)
    notes = sorted(set(n for n in sub["note"] if n))
    for n in notes:
        console.print(f"note: {n}", markup=False)


def entry() -> None:  # console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
