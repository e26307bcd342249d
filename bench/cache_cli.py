"""``bench cache``: check, measure and bound the artifact cache (see :mod:`bench.cache`, docs/reliability.md).

* ``verify``: read and hash every entry; a damaged one is moved into ``<cache>/quarantine/`` (``--keep`` only
  reports). The shipped read-only store is checked too, never changed.
* ``du``: size of the cache by stage kind, of the quarantine and of interrupted writes.
* ``prune``: remove entries by age (not used by any run for a while), or every entry a config's grid does not use;
  ``--dry-run`` lists what would go.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path

from .errors import UserError

#: an interrupted write (``.tmp-*``) older than this is certainly abandoned
STALE_TMP_SECONDS = 3600


def add_parsers(sub, cfg_args) -> dict:
    c = sub.add_parser(
        "cache", help="check, measure and prune the artifact cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The content-addressed artifact cache of a config (run.cache, else <run.output>/cache).",
        epilog=textwrap.dedent("""\
            examples:
              bench cache verify                         hash every entry; quarantine damaged ones
              bench cache verify --keep --config my.toml only report
              bench cache du                             size by stage kind, quarantine, interrupted writes
              bench cache prune --older-than 30d --dry-run
              bench cache prune --unused-by bench.toml --unused-by configs/finetune.toml
              bench cache prune --quarantine             empty the quarantine
              bench cache du --cache /data/markbench-cache
            """))
    cs = c.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND")

    def common(sp):
        cfg_args(sp)
        sp.add_argument("--cache", default=None, metavar="DIR",
                        help="the cache folder (default: the config's run.cache, else <run.output>/cache)")

    v = cs.add_parser("verify", help="read and hash every entry; quarantine damaged ones",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="examples:\n  bench cache verify\n  bench cache verify --keep\n"
                             "exit code: 0 all entries good, 1 damaged entries found")
    common(v)
    v.add_argument("--keep", action="store_true", help="only report damaged entries, do not move them")
    d = cs.add_parser("du", help="disk use of the cache",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="examples:\n  bench cache du\n  bench cache du --config configs/finetune.toml")
    common(d)
    p = cs.add_parser("prune", help="remove entries by age or those a config does not use",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog=textwrap.dedent("""\
                          examples:
                            bench cache prune --older-than 30d          not used by any run for 30 days
                            bench cache prune --older-than 12h --dry-run
                            bench cache prune --unused-by bench.toml    keep only what this grid uses
                            bench cache prune --quarantine              delete quarantined entries
                          With both --older-than and --unused-by an entry goes only if it matches both.
                          Interrupted writes older than an hour are always removed."""))
    common(p)
    p.add_argument("--older-than", default=None, metavar="AGE",
                   help="entries no run has used for AGE: a number with s, m, h or d (e.g. 30d, 12h)")
    p.add_argument("--unused-by", action="append", default=[], metavar="CONFIG",
                   help="entries that no stage of this config's grid uses (repeatable: keep the union)")
    p.add_argument("--quarantine", action="store_true", help="also delete the quarantined entries")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    return {"cache": cmd_cache}


def cmd_cache(args) -> int:
    if args.cache_command is None:
        raise UserError("bench cache needs a subcommand: verify, du or prune (bench cache --help)")
    return {"verify": _verify, "du": _du, "prune": _prune}[args.cache_command](args)


def _store(args):
    from .cache import ArtifactStore, shipped_stores

    if args.cache:
        root = Path(args.cache)
    else:
        from .cli import load_config_from_args

        root = load_config_from_args(args, check_output=False).cache_dir
    if root.exists() and not root.is_dir():
        raise UserError(f"--cache {str(root)!r} is not a folder")
    if args.cache and not root.exists():  # a named folder that is not there is a typo, not an empty cache
        raise UserError(f"--cache {str(root)[:200]!r}: no such folder; name an artifact cache folder (a config's "
                        "run.cache, else <run.output>/cache)")
    return ArtifactStore(root, fallbacks=shipped_stores())


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _verify(args) -> int:
    from .cache import ArtifactStore, CorruptArtifact

    store = _store(args)
    bad = n = 0
    for key, _ in list(store.entries()):
        n += 1
        try:
            store.verify(key)
        except CorruptArtifact as exc:
            bad += 1
            if args.keep:
                print(f"damaged: {exc}")
            else:
                print(f"damaged: {exc}; moved to {store.quarantine(key)}")
    shipped_bad = shipped_n = 0
    for root in store.fallbacks:  # read-only: checked, never moved
        ro = ArtifactStore(root)
        for key, _ in list(ro.entries()):
            shipped_n += 1
            try:
                ro.verify(key)
            except CorruptArtifact as exc:
                shipped_bad += 1
                print(f"damaged (shipped, read-only, left as is: reinstall MarkBench): {exc}")
    print(f"{store.root}: {n} entries, {bad} damaged" + ("" if args.keep or not bad else " (quarantined)")
          + (f"; shipped store: {shipped_n} entries, {shipped_bad} damaged" if store.fallbacks else ""))
    return 1 if bad or shipped_bad else 0


def _kind(folder: Path) -> str:
    import json

    try:
        return str(json.loads((folder / "meta.json").read_text()).get("kind", "?"))
    except Exception:
        return "unreadable"


def _du(args) -> int:
    store = _store(args)
    by_kind: dict[str, list[int]] = {}
    for _, folder in store.entries():
        e = by_kind.setdefault(_kind(folder), [0, 0])
        e[0] += 1
        e[1] += _size(folder)
    total = sum(v[1] for v in by_kind.values())
    print(f"{store.root}: {sum(v[0] for v in by_kind.values())} entries, {_human(total)}")
    for kind, (count, size) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:13s} {count:6d} entries {_human(size):>10s}")
    q = store.root / "quarantine"
    if q.is_dir():
        print(f"  quarantine    {len(list(q.iterdir())):6d} entries {_human(_size(q)):>10s}  "
              "(bench cache prune --quarantine)")
    tmp = list(store.root.glob("??/.tmp-*"))
    if tmp:
        print(f"  interrupted   {len(tmp):6d} writes  {_human(sum(_size(t) for t in tmp)):>10s}")
    return 0


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_age(text: str) -> float:
    m = _AGE.match(text.strip())
    if not m:
        raise UserError(f"--older-than {text[:40]!r} is invalid: it must be a number with s, m, h or d, e.g. 30d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _used_keys(config: str) -> set[str]:
    from .config import load_config
    from .plan import build_plan

    plan = build_plan(load_config(config, check_output=False))
    return set(plan.stages)


def _prune(args) -> int:
    if args.older_than is None and not args.unused_by and not args.quarantine:
        raise UserError("bench cache prune needs --older-than AGE, --unused-by CONFIG or --quarantine "
                        "(bench cache prune --help)")
    max_age = parse_age(args.older_than) if args.older_than is not None else None
    store = _store(args)
    keep: set[str] | None = None
    if args.unused_by:
        keep = set()
        for config in args.unused_by:
            keep |= _used_keys(config)
    now = time.time()
    doomed: list[Path] = []
    # entries are pruned only by a criterion on entries: `--quarantine` alone empties the quarantine, nothing else
    entries = store.entries() if max_age is not None or keep is not None else ()
    for key, folder in entries:
        if max_age is not None and now - folder.stat().st_mtime < max_age:
            continue
        if keep is not None and key in keep:
            continue
        doomed.append(folder)
    doomed += [t for t in store.root.glob("??/.tmp-*") if now - t.stat().st_mtime > STALE_TMP_SECONDS]
    if args.quarantine and (store.root / "quarantine").is_dir():
        doomed += sorted((store.root / "quarantine").iterdir())
    freed = 0
    for folder in doomed:
        size = _size(folder)
        freed += size
        if args.dry_run:
            print(f"would remove {folder} ({_human(size)})")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    verb = "would free" if args.dry_run else "freed"
    print(f"{store.root}: {len(doomed)} entries, {verb} {_human(freed)}", file=sys.stdout)
    return 0
