"""``bench zoo embed``: ship pre-embedded tiny-world defences, so ``bench run`` reads them instead of training them.

For every defence of the given configs (which must use a shipped model: ``model.builtin = "tiny-sd"`` or
``"tiny-sd-rt"``), the embed stage is
computed exactly as ``bench run`` computes it (same plan, same stage key, same seed-derived generator) and its
artifact is copied into ``worlds/tiny/artifacts/prebuilt/<key[:2]>/<key>/``. The runner reads that folder as a
read-only fallback store (:func:`bench.cache.shipped_stores`): a config whose defence entry has the same parameters,
seed and base model hits the shipped artifact; any other config computes its own. ``MARKBENCH_NO_PREBUILT=1``
ignores the shipped artifacts (to re-embed from scratch and compare).

Re-embedding a config drops the embeddings shipped for it that it no longer asks for (changed parameters), and
every embedding whose model's files changed since.

The manifest records each shipped embedding (defence, label, model, parameters, stage key, seconds, costs, bytes) under
``prebuilt``, and its files under ``files.prebuilt`` (``bench zoo info --check`` verifies them).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from . import ARTIFACTS, PREBUILT, fingerprint

#: the shipped models an embedding can be shipped for
SHIPPED_MODELS = ("tiny-sd", "tiny-sd-rt")


def base_fingerprint(model: str) -> str:
    """Identity of the shipped model an embedding was made on (tiny-sd-rt is tiny-sd plus its own VAE)."""
    return fingerprint("tiny-sd") + ("" if model == "tiny-sd" else "+" + fingerprint(model))


def embed_configs(configs: list[str | Path], out: Path = ARTIFACTS, log: Callable[[str], None] = print,
                  progress=None, force: bool = False) -> list[dict]:
    """Embed the in-model defences of ``configs`` on their shipped model and ship them into ``out/prebuilt``."""
    from markbench.cache import ArtifactStore
    from markbench.config import load_config
    from markbench.errors import UserError
    from markbench.plan import build_plan
    from markbench.stages import StageEnv, run_stage
    from .build import _readable, file_table, write_manifest_core

    out = Path(out)
    prebuilt = out / PREBUILT.name
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    listed = {r["key"] for r in manifest.get("prebuilt", [])}
    asked: dict[str, set[str]] = {}
    records = []
    for path in configs:
        cfg = load_config(path)
        if cfg.model.builtin not in SHIPPED_MODELS:
            raise UserError(f"{path}: model.builtin = {cfg.model.builtin or cfg.model.source!r}; 'bench zoo embed' "
                            f"ships embeddings of the tiny world only (model.builtin = 'tiny-sd' or 'tiny-sd-rt')")
        model = cfg.model.builtin
        plan = build_plan(cfg)
        asked[str(path)] = {s.key for s in plan.stages.values() if s.kind == "embed"}
        store = ArtifactStore(cfg.cache_dir)  # no fallbacks: compute here, then ship
        env = StageEnv(cfg, plan, store, progress)
        for stage in plan.stages.values():
            if stage.kind != "embed":
                continue
            if not force and stage.key in listed and (prebuilt / stage.key[:2] / stage.key / "meta.json").exists():
                log(f"{stage.plugin.label}: already shipped ({stage.key[:12]})")
                continue
            if force and store.exists(stage.key):
                shutil.rmtree(store.own_path(stage.key))
            t0 = time.perf_counter()
            if not store.exists(stage.key):
                log(f"{stage.plugin.label}: embedding on {model} ...")
                meta = run_stage(stage, env)
            else:
                meta = store.meta(stage.key)
            dst = prebuilt / stage.key[:2] / stage.key
            if dst.exists():
                shutil.rmtree(dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(store.path(stage.key), dst)
            size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
            rec = {"defense": stage.plugin.name, "label": stage.plugin.label, "key": stage.key,
                   "params": stage.plugin.identity().get("params"), "config": str(path),
                   "model": model, "base": base_fingerprint(model), "seconds": round(meta.get("seconds", 0.0), 1),
                   "wall_seconds_here": round(time.perf_counter() - t0, 1),
                   "costs": meta.get("costs", {}), "bytes": size}
            records.append(rec)
            log(f"{stage.plugin.label}: shipped {stage.key[:12]} ({size / 2**20:.2f} MiB, "
                f"{rec['seconds']:.0f} s to embed)")
    if prebuilt.exists():
        _readable(prebuilt)
    # an embedding shipped for one of these configs that it no longer asks for (its parameters changed) is dropped
    shipped = {r["key"]: r for r in manifest.get("prebuilt", [])
               if r.get("config") not in asked or r["key"] in asked[r["config"]]}
    shipped.update({r["key"]: r for r in records})
    for key, rec in list(shipped.items()):  # embeddings of an older model can never be hit again: drop them
        if rec.get("base") != base_fingerprint(rec.get("model", "tiny-sd")) or not (prebuilt / key[:2] / key).exists():
            shipped.pop(key)
    if prebuilt.exists():
        for folder in [p for p in prebuilt.glob("*/*") if p.is_dir()]:
            if folder.name not in shipped:
                shutil.rmtree(folder)
        for folder in [p for p in prebuilt.glob("*") if p.is_dir() and not any(p.iterdir())]:
            folder.rmdir()
    manifest["prebuilt"] = list(shipped.values())
    core = write_manifest_core(out, manifest.get("seed", 0), manifest.get("build_seconds_last_run", 0.0), manifest)
    manifest["files"], manifest["total_bytes"] = core["files"], core["total_bytes"]
    manifest_path.write_text(json.dumps(manifest, indent=1, default=str))
    return records
