"""The guarantees of docs/reliability.md: a damaged cache entry is healed on the next run; a run killed with SIGKILL
and resumed gives, cell by cell, the numbers of an uninterrupted run; two runs at once on one cache both finish with
the same numbers and leave the cache intact; a generated image's key names the batch size its pixels depend on."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from markbench.cache import ArtifactStore
from markbench.cli import main
from markbench.config import load_config
from markbench.plan import build_plan
from markbench.runner import Runner
from markbench.store import ResultStore

from .conftest import MICRO_TOML, write_config

ROOT = Path(__file__).resolve().parent.parent

#: a grid of 2 defences x 2 image attacks (none, jpeg) on micro-sd, 2 images, 2 steps
SMALL = (MICRO_TOML.replace("num_images = 4", "num_images = 2").replace("batch_size = 4", "batch_size = 2")
         .replace('output = "{output}"', 'output = "{output}"\ncache = "{cache}"')
         .replace("quality = [90, 50]", "quality = 50"))

#: a longer grid for the subprocess tests: 3 defences x 4 image attacks = 12 cells
LONG = SMALL + """
[[defenses]]
name = "dwtdct"

[[image_attacks]]
name = "gaussian_blur"
strength = [0.25, 0.5]
"""


def _values(output: Path) -> dict[tuple[str, str], float | None]:
    store = ResultStore(output / "results.sqlite")
    try:
        df = store.dataframe()
    finally:
        store.close()
    assert set(df.status) == {"ok"}
    return {(r.cell, r.metric): r.value for r in df.itertuples()}


def _config(tmp: Path, text: str, name: str, output: str, cache: Path) -> Path:
    return write_config(tmp, text, name=name, output=str(tmp / output), cache=str(cache))


def _keys(cfg, kind: str) -> list[str]:
    return [k for k, s in build_plan(cfg).stages.items() if s.kind == kind]


def test_damaged_cache_entries_are_quarantined_and_recomputed_on_the_next_run(tmp_path):
    cache = tmp_path / "cache"
    first = load_config(_config(tmp_path, SMALL, "a.toml", "a", cache))
    assert Runner(first).run().ok
    store = ArtifactStore(cache)
    gen = _keys(first, "generate")[0]
    embed = [k for k in _keys(first, "embed") if store.exists(k) and store.tensors(k)][0]
    attack = _keys(first, "image_attack")[0]
    detect = _keys(first, "detect")[-1]
    (store.path(gen) / "meta.json").write_text("{not json")  # caught by the check before reuse
    t = store.path(detect) / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[:-9])  # truncated: caught by the size check
    png = sorted((store.path(attack) / "images").glob("*.png"))[0]
    png.write_bytes(os.urandom(png.stat().st_size))  # garbage of the right size: caught by the hash on read
    e = store.path(embed) / "tensors.safetensors"
    data = bytearray(e.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the secret: caught by the hash on read
    e.write_bytes(bytes(data))

    warnings: list[str] = []
    second = load_config(_config(tmp_path, SMALL, "b.toml", "b", cache))
    summary = Runner(second, warn=warnings.append).run()
    assert summary.ok, summary.cells_failed
    assert set(summary.healed) == {gen, detect, attack, embed}
    assert len(warnings) == 4 and all("\n" not in w and "damaged" in w for w in warnings)
    assert len(list((cache / "quarantine").iterdir())) == 4
    assert _values(tmp_path / "b") == _values(tmp_path / "a")
    for key in (gen, detect, attack, embed):
        store.verify(key)  # recomputed and whole again
    assert main(["cache", "verify", "--cache", str(cache)]) == 0


def test_generate_key_names_the_batch_size(tmp_path):
    """Pixels depend on the batch an image is sampled in (docs/reliability.md): batch sizes get their own images,
    while everything upstream (the embedded models, the shipped store's keys) is shared."""
    plans = {}
    for bs in (1, 3, 8):
        text = SMALL.replace("batch_size = 2", f"batch_size = {bs}")
        plans[bs] = build_plan(load_config(_config(tmp_path, text, f"b{bs}.toml", "o", tmp_path / "c")))
    gens = {bs: {k for k, s in p.stages.items() if s.kind == "generate"} for bs, p in plans.items()}
    embeds = {bs: {k for k, s in p.stages.items() if s.kind == "embed"} for bs, p in plans.items()}
    assert gens[1].isdisjoint(gens[3]) and gens[3].isdisjoint(gens[8])
    assert embeds[1] == embeds[3] == embeds[8]
    assert all(dict(s.extra)["request"]["batch_size"] == bs for bs, p in plans.items()
               for s in p.stages.values() if s.kind == "generate")


# ------------------------------------------------------------------------------------------------------------------
def _bench(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "markbench.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ok_cells(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(db, timeout=1)
        try:
            return con.execute("select count(*) from cells where status='ok'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_run_killed_with_sigkill_mid_grid_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path):
    ref_cfg = _config(tmp_path, LONG, "ref.toml", "ref", tmp_path / "ref-cache")
    ref = _bench("run", "--config", str(ref_cfg), "--no-progress", cwd=tmp_path)
    cfg = _config(tmp_path, LONG, "k.toml", "k", tmp_path / "k-cache")
    db = tmp_path / "k" / "results.sqlite"
    kills = 0
    for _ in range(3):  # killed three times, at different points of the grid
        proc = _bench("run", "--config", str(cfg), "--no-progress", cwd=tmp_path)
        start = _ok_cells(db)
        deadline = time.time() + 600
        while proc.poll() is None and _ok_cells(db) < start + 2 and time.time() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.communicate()
    n_total = 12
    assert kills >= 1 and _ok_cells(db) < n_total, "the run finished before it could be killed"
    assert main(["cache", "verify", "--cache", str(tmp_path / "k-cache")]) == 0  # nothing half-written
    out, err = _bench("run", "--config", str(cfg), "--no-progress", cwd=tmp_path).communicate()
    assert _ok_cells(db) == n_total, err
    ref_out, ref_err = ref.communicate()
    assert ref.returncode == 0, ref_err
    resumed, uninterrupted = _values(tmp_path / "k"), _values(tmp_path / "ref")
    assert len({c for c, _ in uninterrupted}) == n_total
    assert resumed == uninterrupted  # cell by cell, metric by metric, bit for bit


@pytest.mark.slow
def test_two_concurrent_runs_on_one_cache_both_finish_with_equal_numbers(tmp_path):
    cache = tmp_path / "shared-cache"
    a = _bench("run", "--config", str(_config(tmp_path, LONG, "a.toml", "a", cache)), "--no-progress", cwd=tmp_path)
    b = _bench("run", "--config", str(_config(tmp_path, LONG, "b.toml", "b", cache)), "--no-progress", cwd=tmp_path)
    (_, a_err), (_, b_err) = a.communicate(), b.communicate()
    assert a.returncode == 0, a_err
    assert b.returncode == 0, b_err
    assert _values(tmp_path / "a") == _values(tmp_path / "b")
    assert main(["cache", "verify", "--cache", str(cache)]) == 0
    assert not list(cache.glob("??/.tmp-*"))  # both runs cleaned up their temporary folders
