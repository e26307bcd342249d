"""``bench zoo info``: what is shipped (files, sizes, checksums), how it was trained, and how good it is."""

from __future__ import annotations

import json
from pathlib import Path

from . import ARTIFACTS
from .common import file_sha256


def load_manifest(folder: Path = ARTIFACTS) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def verify(folder: Path = ARTIFACTS, manifest: dict | None = None) -> list[str]:
    """Problems found comparing the files on disk with the manifest's sizes and checksums (empty: all good)."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else load_manifest(folder)
    problems = []
    for comp, files in manifest.get("files", {}).items():
        for rel, meta in files.items():
            p = folder / comp / rel
            if not p.exists():
                problems.append(f"{comp}/{rel}: missing")
            elif p.stat().st_size != meta["bytes"]:
                problems.append(f"{comp}/{rel}: {p.stat().st_size} bytes, manifest says {meta['bytes']}")
            elif file_sha256(p) != meta["sha256"]:
                problems.append(f"{comp}/{rel}: sha256 differs from the manifest")
    return problems


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else str(v)


def print_info(console, folder: Path = ARTIFACTS, check: bool = False, show_files: bool = True) -> int:
    from rich.table import Table

    m = load_manifest(folder)
    if not m:
        console.print(f"no manifest in {folder}: nothing is built; run 'bench zoo build'", markup=False)
        return 1
    console.print(f"[bold]tiny world[/] artifacts in {folder}  (seed {m.get('seed')}, built {m.get('built_at')}, "
                  f"total {_mib(m.get('total_bytes', 0))})", highlight=False)
    w = m.get("world", {})
    if w:
        console.print(f"world: {w['image_size']}x{w['image_size']} px; {len(w['shapes'])} shapes, "
                      f"{len(w['colours'])} colours, {len(w['backgrounds'])} backgrounds, sizes "
                      f"{', '.join(w['sizes'])}; downstream style 'striped', subject '{w['subject_token']}' "
                      f"({w['subject_shape']}); held-out: {w['heldout']}", markup=False)
    if show_files:
        t = Table(title="files", title_justify="left")
        t.add_column("file")
        t.add_column("size", justify="right")
        t.add_column("sha256")
        for comp, files in m.get("files", {}).items():
            for rel, meta in files.items():
                if meta["bytes"] >= 1024:
                    t.add_row(f"{comp}/{rel}", _mib(meta["bytes"]), meta["sha256"][:16] + "...")
        console.print(t)
    tr = m.get("training", {})
    if tr:
        t = Table(title="training", title_justify="left")
        t.add_column("model")
        t.add_column("steps", justify="right")
        t.add_column("CPU s", justify="right")
        t.add_column("finished")
        t.add_column("settings")
        for name, res in tr.items():
            s = res.get("settings", {})
            keys = [k for k in ("batch_size", "lr", "decoder_steps", "roundtrip_steps", "min_snr_gamma", "cfg_drop",
                                "ema_decay")
                    if k in s]
            done = res.get("finished")
            t.add_row(name, str(res.get("steps")), str(res.get("cpu_seconds")),
                      "yes" if done else ("no: stopped at this checkpoint" if done is False else "?"),
                      ", ".join(f"{k}={s[k]}" for k in keys))
        console.print(t)
    q = m.get("quality")
    if q:
        t = Table(title="quality (held-out)", title_justify="left")
        t.add_column("figure")
        t.add_column("value", justify="right")
        t.add_column("N", justify="right")
        c = q["clip_zero_shot_heldout"]
        for a in ("shape", "colour", "background", "size"):
            t.add_row(f"CLIP zero-shot {a} accuracy", _pct(c[a]), str(c["n"]))
        v = q["vae_psnr_db"]
        for k in ("heldout", "style", "subject"):
            t.add_row(f"VAE round-trip PSNR, {k}", f"{v[k]:.2f} dB", str(v["n"]))
        rt = tr.get("vae", {}).get("roundtrip_psnr")
        if rt:
            n_eval = str(tr["vae"].get("settings", {}).get("n_eval", ""))
            for k in ("heldout", "style", "subject"):
                t.add_row(f"tiny-sd-rt VAE round-trip PSNR, {k}", f"{rt[k]:.2f} dB", n_eval)
        ind = tr.get("vae-ind", {}).get("heldout_psnr")
        if ind:
            for k in ("heldout", "style", "subject"):
                t.add_row(f"tiny-vae-ind (attacker VAE) round-trip PSNR, {k}", f"{ind[k]:.2f} dB", str(ind["n"]))
        ldm = q["ldm_heldout_accuracy"]
        for k, r in ldm.items():
            if isinstance(r, dict):
                scale = k[3:]
                t.add_row(f"LDM shape+colour, guidance {scale}", _pct(r["shape_and_colour"]), str(r["n"]))
                t.add_row(f"  shape / colour, guidance {scale}", f"{_pct(r['shape'])} / {_pct(r['colour'])}", "")
        ind_ldm = tr.get("unet-ind", {}).get("quality", {}).get("ldm_heldout_accuracy", {})
        for k, r in ind_ldm.items():
            if isinstance(r, dict):
                scale = k[3:]
                t.add_row(f"tiny-sd-ind (attacker pipeline) shape+colour, guidance {scale}",
                          _pct(r["shape_and_colour"]), str(r["n"]))
                t.add_row(f"  shape / colour, guidance {scale}", f"{_pct(r['shape'])} / {_pct(r['colour'])}", "")
        console.print(t)
        met = m.get("targets_met", {})
        if met:
            console.print("targets: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in met.items()),
                          markup=False)
    pre = m.get("prebuilt")
    if pre:
        t = Table(title="pre-embedded defences (bench zoo embed; bench run reads them instead of training)",
                  title_justify="left")
        t.add_column("defence")
        t.add_column("stage key")
        t.add_column("embed s", justify="right")
        t.add_column("size", justify="right")
        t.add_column("config")
        for r in pre:
            t.add_row(r.get("label", r.get("defense")), r["key"][:12], f"{r.get('seconds', 0):.0f}",
                      _mib(r.get("bytes", 0)), r.get("config", ""))
        console.print(t)
    if check:
        problems = verify(folder, m)
        if problems:
            for p in problems:
                console.print(f"[red]{p}[/]")
            return 1
        console.print("checksums: all files match the manifest")
    return 0
