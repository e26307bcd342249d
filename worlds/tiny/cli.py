"""``bench zoo build | info | eval``: the tiny world's models (light imports only at module top)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path


def add_parsers(sub, cfg_args) -> dict:
    z = sub.add_parser(
        "zoo", help="the tiny world's models: build, info, eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The shipped tiny-world models (tiny-sd, tiny-clip): rebuild them, show them, measure them.",
        epilog=textwrap.dedent("""\
            examples:
              bench zoo info                      what is shipped: sizes, checksums, training, quality
              bench zoo info --check              also verify every file's sha256 against the manifest
              bench zoo eval                      recompute the quality figures of the shipped models
              bench zoo build --seed 0            rebuild everything (hours on a 2-core CPU)
              bench zoo build --only unet --resume
              bench zoo build --only vae-ind      (re)build the independent attacker VAE (tiny-vae-ind) alone
              bench zoo build --only unet-ind     (re)build the attacker UNet of tiny-sd-ind (needs tiny-vae-ind)
              bench zoo ship --work DIR           ship the latest checkpoints of a running build
              bench zoo embed                     ship the defences of bench.toml pre-embedded in the tiny world
              bench zoo embed configs/sleepermark-tiny.toml --force   re-train one (SleeperMark: ~15 min, two threads)
            """))
    zs = z.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    b = zs.add_parser("build", help="rebuild the artifacts from a seed (resumable)")
    b.add_argument("--only", choices=("clip", "vae", "unet", "vae-ind", "unet-ind"), default=None,
                   help="run one stage (vae-ind / unet-ind: the independent attacker VAE / UNet)")
    b.add_argument("--resume", action="store_true", help="continue from the latest checkpoints in --work")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--work", default=None, help="work folder (default: $MARKBENCH_HOME/zoo-build/seed-N)")
    b.add_argument("--out", default=None, help="artifacts folder (default: the package's worlds/tiny/artifacts)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--no-measure", action="store_true", help="skip the quality figures at the end")
    b.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    sh = zs.add_parser("ship", help="ship the latest checkpoints of a build (finished or still running)")
    sh.add_argument("--work", default=None, help="work folder (default: $MARKBENCH_HOME/zoo-build/seed-N)")
    sh.add_argument("--seed", type=int, default=0)
    sh.add_argument("--out", default=None, help="artifacts folder (default: the package's)")
    sh.add_argument("--no-measure", action="store_true", help="skip the quality figures")
    sh.add_argument("--quick", action="store_true", help="quality figures with smaller N")
    em = zs.add_parser("embed", help="embed the defences of configs in the tiny world and ship them (bench run "
                       "reuses them)")
    em.add_argument("configs", nargs="*", default=None, help="configs using model.builtin = 'tiny-sd' or "
                    "'tiny-sd-rt' (default: the shipped bench.toml)")
    em.add_argument("--force", action="store_true", help="re-embed even where a shipped embedding exists")
    em.add_argument("--out", default=None, help="artifacts folder (default: the package's)")
    i = zs.add_parser("info", help="print what is shipped")
    i.add_argument("--check", action="store_true", help="verify sha256 checksums against the manifest")
    i.add_argument("--dir", default=None, help="artifacts folder (default: the package's)")
    e = zs.add_parser("eval", help="recompute the quality figures of the artifacts")
    e.add_argument("--dir", default=None, help="artifacts folder (default: the package's)")
    e.add_argument("--quick", action="store_true", help="smaller N (about a minute)")
    e.add_argument("--write", action="store_true", help="store the figures in manifest.json")
    z.set_defaults(_zoo_parser=z)
    return {"zoo": cmd_zoo}


def cmd_zoo(args) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    sub = getattr(args, "zoo_command", None)
    if sub is None:
        args._zoo_parser.print_help()
        return 0
    if sub == "info":
        from . import ARTIFACTS
        from .info import print_info

        return print_info(console, Path(args.dir) if args.dir else ARTIFACTS, check=args.check)
    if sub == "eval":
        return _eval(args, console)
    if sub == "ship":
        return _ship(args, console)
    if sub == "embed":
        return _embed(args, console)
    return _build(args, console)


def _eval(args, console) -> int:
    import json

    from . import ARTIFACTS
    from .evaluate import check_targets, measure_all
    from .info import load_manifest, print_info

    folder = Path(args.dir) if args.dir else ARTIFACTS
    if not (folder / "tiny-sd" / "model_index.json").exists():
        from markbench.errors import UserError

        raise UserError(f"{folder}/tiny-sd: no pipeline there; run 'bench zoo build' first")
    q = measure_all(folder / "tiny-sd", folder / "tiny-clip", quick=args.quick,
                    log=lambda m: console.print(m, markup=False))
    met = check_targets(q)
    console.print_json(json.dumps({"quality": q, "targets_met": met}))
    if args.write:
        m = load_manifest(folder)
        m["quality"], m["targets_met"] = q, met
        (folder / "manifest.json").write_text(json.dumps(m, indent=1))
        print_info(console, folder, show_files=False)
    return 0 if all(met.values()) else 1


def _embed(args, console) -> int:
    from markbench.config import default_config_path
    from markbench.progress import Progress
    from . import ARTIFACTS
    from .embed import embed_configs

    configs = args.configs or [default_config_path()]
    progress = Progress(console=console)
    with progress.live():
        embed_configs(configs, Path(args.out) if args.out else ARTIFACTS, force=args.force, progress=progress,
                      log=lambda m: console.print(m, markup=False))
    return 0


def _ship(args, console) -> int:
    from . import ARTIFACTS
    from .build import ship, work_dir
    from .common import Logger
    from .info import print_info

    out = Path(args.out) if args.out else ARTIFACTS
    work = Path(args.work) if args.work else work_dir(args.seed)
    if not (work / "unet" / "checkpoint.pt").exists():
        from markbench.errors import UserError

        raise UserError(f"{work}: no UNet checkpoint there; start 'bench zoo build' first")
    ship(work, out, args.seed, measure=not args.no_measure, quick=args.quick, log=Logger(work / "build.log"))
    return print_info(console, out, show_files=False)


def _build(args, console) -> int:
    import torch

    from .build import BuildPlan, build, work_dir
    from .common import Logger, NullBar, RichBar

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = BuildPlan(seed=args.seed, work=Path(args.work) if args.work else None, only=args.only,
                     resume=args.resume, measure=not args.no_measure)
    if args.out:
        plan.out = Path(args.out)
    work = Path(plan.work or work_dir(plan.seed))
    show_bars = not args.no_progress and sys.stderr.isatty()
    bar = RichBar() if show_bars else NullBar()
    log = Logger(work / "build.log", quiet=show_bars)
    console.print(f"work folder: {work} (log: {work / 'build.log'})", markup=False)
    m = build(plan, bar=bar, log=log)
    console.print(f"built: {plan.out} ({m.get('total_bytes', 0) / 2 ** 20:.1f} MiB)", markup=False)
    return 0
