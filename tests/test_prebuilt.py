"""Shipped pre-embedded defences: the read-only fallback store, and the shipped grid actually hitting it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from markbench.worlds import tiny as zoo
from markbench.cache import ArtifactStore, shipped_stores
from markbench.config import load_config
from markbench.errors import UserError
from markbench.models import builtin_folder
from markbench.plan import build_plan
from markbench.prompts import BUILTIN_PROMPTS

ROOT = Path(__file__).resolve().parent.parent


def test_fallback_store_is_read_but_never_written(tmp_path):
    shipped, own = ArtifactStore(tmp_path / "shipped"), tmp_path / "own"
    shipped.write("ab" * 32, meta={"from": "shipped"}, tensors={"x": torch.ones(2)})
    store = ArtifactStore(own, fallbacks=(tmp_path / "shipped",))
    assert store.exists("ab" * 32) and store.shipped("ab" * 32)
    assert store.meta("ab" * 32)["from"] == "shipped"
    assert torch.equal(store.tensors("ab" * 32)["x"], torch.ones(2))
    # writing an existing key is a no-op; nothing lands in the fallback or the own store
    store.write("ab" * 32, meta={"from": "own"})
    assert store.meta("ab" * 32)["from"] == "shipped" and not own.exists()
    # a key missing everywhere is written to the own store, and the own copy wins over a shipped one
    store.write("cd" * 32, meta={"from": "own"})
    assert (own / "cd" / ("cd" * 32) / "meta.json").exists() and not store.shipped("cd" * 32)
    ArtifactStore(tmp_path / "shipped").write("cd" * 32, meta={"from": "shipped"})
    assert store.meta("cd" * 32)["from"] == "own"


def test_prebuilt_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("MARKBENCH_NO_PREBUILT", "1")
    assert shipped_stores() == ()


def test_tiny_prompt_sets_are_disjoint_domain_captions():
    from markbench.worlds.tiny import shapes

    held, train = BUILTIN_PROMPTS["tiny"], BUILTIN_PROMPTS["tiny-train"]
    assert len(held) == 64 and len(set(held)) == 64 and len(train) == 128 and len(set(train)) == 128
    train_combos, held_combos = map(set, shapes.combinations())
    for cap in held:
        a = shapes.parse_caption(cap)
        assert (a["shape"], a["colour"], a["background"]) in held_combos
    for cap in train:
        a = shapes.parse_caption(cap)
        assert (a["shape"], a["colour"], a["background"]) in train_combos
    assert {shapes.parse_caption(c)["shape"] for c in held} == set(shapes.SHAPES)


def test_missing_tiny_sd_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "TINY_SD", tmp_path / "tiny-sd")
    with pytest.raises(UserError, match="bench zoo build"):
        builtin_folder("tiny-sd")


@pytest.mark.parametrize("label,config", [("sleepermark", "configs/sleepermark-tiny.toml"),
                                          ("aqualora", "configs/aqualora-tiny.toml"),
                                          ("wdm", "configs/wdm-tiny.toml")])
def test_grids_borrowing_a_defence_share_its_embedding(label, config):
    """The embed stage key hashes the parameters and the model: entries borrowed with `from` have the same
    parameters, and on the same model share one (shipped) embedding (SleeperMark's config runs on tiny-sd-rt, the
    model-attack grid on tiny-sd: same parameters, another key)."""
    def embed_stage(path):
        cfg = load_config(ROOT / path, check_output=False)
        plan = build_plan(cfg)
        return cfg.model.builtin, next(s for s in plan.stages.values() if s.kind == "embed" and s.plugin.label == label)

    (model_a, a), (model_b, b) = embed_stage("configs/finetune.toml"), embed_stage(config)
    assert a.plugin.identity() == b.plugin.identity()
    assert (a.key == b.key) == (model_a == model_b)


shipped = pytest.mark.skipif(not zoo.MANIFEST.exists(), reason="tiny world not built")


@shipped
def test_shipped_embeddings_belong_to_the_shipped_tiny_sd():
    from markbench.worlds.tiny.embed import base_fingerprint

    manifest = json.loads(zoo.MANIFEST.read_text())
    store = ArtifactStore(ROOT / "no-such-cache", fallbacks=(zoo.PREBUILT,))
    for rec in manifest.get("prebuilt", []):
        assert store.shipped(rec["key"]), f"{rec['label']}: listed in the manifest but not shipped"
        model = rec.get("model", "tiny-sd")
        assert rec["base"] == base_fingerprint(model), f"{rec['label']}: embedded in another {model}"
    if zoo.PREBUILT.exists():
        listed = {rec["key"] for rec in manifest.get("prebuilt", [])}
        assert {p.name for p in zoo.PREBUILT.glob("*/*")} <= listed


@shipped
def test_every_shipped_embedding_is_still_what_its_config_asks_for():
    """A change to a defence's parameters (a new parameter included: its default enters the stage key, unless it is
    declared with ``keyed_at_default=False``) makes its config ask for another key, and the shipped embedding is then
    silently retrained by every run. Re-ship it (`bench zoo embed CONFIG`) with the change."""
    manifest = json.loads(zoo.MANIFEST.read_text())
    for rec in manifest.get("prebuilt", []):
        plan = build_plan(load_config(ROOT / rec["config"], check_output=False))
        keys = {s.key for s in plan.stages.values() if s.kind == "embed" and s.plugin.label == rec["label"]}
        assert rec["key"] in keys, f"{rec['label']} in {rec['config']}: shipped {rec['key'][:12]}, config asks " \
                                   f"for {sorted(k[:12] for k in keys)}"


def _tiny_grid(tmp_path, model: str, entries: str):
    """A two-image grid on a shipped model with the given defence / attack entries, written to tmp_path."""
    path = tmp_path / "grid.toml"
    path.write_text(f"""
[run]
output = "{tmp_path / 'run'}"
num_images = 2
[model]
builtin = "{model}"
num_inference_steps = 2
[prompts]
builtin = "tiny"
""" + entries)
    return path


@pytest.mark.skipif(not (zoo.TINY_SD / "model_index.json").exists(), reason="tiny world not built")
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd-rt"])
def test_zoo_embed_ships_embed_stages_that_a_run_then_reads(tmp_path, monkeypatch, model):
    from markbench.worlds.tiny.embed import base_fingerprint, embed_configs

    cfg_path = _tiny_grid(tmp_path, model, """
[[defenses]]
name = "dwtdct"
[[image_attacks]]
name = "jpeg"
quality = 50
""")
    out = tmp_path / "artifacts"
    out.mkdir()
    records = embed_configs([cfg_path], out, log=lambda m: None)
    assert [r["defense"] for r in records] == ["dwtdct"]
    assert records[0]["model"] == model and records[0]["base"] == base_fingerprint(model)
    assert (model == "tiny-sd-rt") == ("+" in records[0]["base"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["key"] for r in manifest["prebuilt"]} == {r["key"] for r in records}
    assert set(manifest["files"]) == {"prebuilt"} and manifest["total_bytes"] > 0
    # a fresh run of the same grid reads the shipped embedding instead of computing it
    plan = build_plan(load_config(cfg_path))
    store = ArtifactStore(tmp_path / "elsewhere", fallbacks=(out / "prebuilt",))
    for stage in plan.stages.values():
        if stage.kind == "embed":
            assert store.shipped(stage.key)


def _shipped_label(label: str) -> bool:
    if not zoo.MANIFEST.exists():
        return False
    return any(r["label"] == label for r in json.loads(zoo.MANIFEST.read_text()).get("prebuilt", []))


def _bench_run(tmp_path, config: str, only: str, n: int = 8):
    """`bench run` of a config's cells ``only`` on ``n`` captions into ``tmp_path``; returns ``value(cell_prefix,
    metric)`` and whether any embed stage ran (for a shipped embedding it must not: the shipped one is read)."""
    import pandas as pd

    from markbench.cli import main

    out, csv, cache = tmp_path / "run", tmp_path / "r.csv", tmp_path / "cache"
    args = ["--config", str(ROOT / config), "--output", str(out), "--set", f"run.num_images={n}",
            "--set", f"run.cache={cache}"]
    assert main(["run", *args, "--only", only, "--no-progress"]) == 0
    embedded = any(json.loads(p.read_text())["kind"] == "embed" for p in cache.glob("*/*/meta.json"))
    assert main(["export", *args, "--to", str(csv)]) == 0
    df = pd.read_csv(csv)

    def value(row, metric):
        sel = df[(df.cell == f"{row}/none/none/s0") & (df.metric == metric)]
        assert len(sel) == 1, (row, metric, sorted(set(df.cell)))
        return float(sel.value.iloc[0])

    return value, embedded


@pytest.mark.skipif(not _shipped_label("sleepermark"), reason="no shipped SleeperMark embedding")
def test_shipped_sleepermark_wakes_with_the_trigger_and_sleeps_without(tmp_path):
    """The shipped SleeperMark embedding, end to end through `bench run` on 8 held-out captions: it is read, not
    retrained, the trigger's images carry the key and are detected at FPR 1e-6, the trigger-free ones do not, and
    nothing is detected in them at FPR 1e-6. The issue's targets, checked on 8 captions: >= 0.95 bit accuracy and TPR
    at 1e-6 >= 0.9 with the trigger, <= 0.6 without (N = 32 measured 0.981, TPR 1.00 / 0.505, docs/sleepermark.md)."""
    value, embedded = _bench_run(tmp_path, "configs/sleepermark-tiny.toml", "sleepermark*/none/none/*")
    assert not embedded
    assert value("sleepermark", "bit_accuracy") >= 0.95
    assert value("sleepermark", "tpr@1e-06") >= 0.9
    assert value("sleepermark[no_trigger]", "bit_accuracy") <= 0.6
    assert value("sleepermark[no_trigger]", "tpr@1e-06") == 0.0


@pytest.mark.skipif(not _shipped_label("stable_signature"), reason="no shipped Stable Signature embedding")
def test_shipped_stable_signature_reads_its_key_above_chance(tmp_path):
    """The shipped Stable Signature embedding (its decoder fine-tuned, key partly written: 0.686 at N = 32,
    docs/stable_signature.md; N = 8 read 0.667) is read, not retrained, and its images carry the key above the
    clean model's chance level."""
    value, embedded = _bench_run(tmp_path, "configs/stable-signature-tiny.toml", "*/none/none/*")
    assert not embedded
    assert value("stable_signature", "bit_accuracy") > 0.6
    assert abs(value("none", "bit_accuracy") - 0.5) < 0.1


@pytest.mark.skipif(not (zoo.TINY_SD / "model_index.json").exists(), reason="tiny world not built")
def test_zoo_embed_replaces_an_entrys_older_embedding_and_keeps_the_others(tmp_path):
    """Re-embedding a config entry with changed parameters ships the new embedding and drops the old one (its key can
    never be asked for again); another entry's embedding stays; a folder without a manifest record is re-shipped."""
    from markbench.worlds.tiny.embed import embed_configs

    def grid(bits):
        return _tiny_grid(tmp_path, "tiny-sd", f"""
[[defenses]]
name = "dwtdct"
bits = {bits}
[[defenses]]
name = "dwtdctsvd"
""")

    out = tmp_path / "artifacts"
    out.mkdir()
    first = {r["defense"]: r["key"] for r in embed_configs([grid(48)], out, log=lambda m: None)}
    second = {r["defense"]: r["key"] for r in embed_configs([grid(32)], out, log=lambda m: None)}
    assert second.keys() == {"dwtdct"} and second["dwtdct"] != first["dwtdct"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["key"] for r in manifest["prebuilt"]} == {second["dwtdct"], first["dwtdctsvd"]}
    assert {p.name for p in (out / "prebuilt").glob("*/*")} == {second["dwtdct"], first["dwtdctsvd"]}
    # a shipped folder the manifest does not list is not "already shipped": it is shipped again, and listed
    manifest["prebuilt"] = [r for r in manifest["prebuilt"] if r["defense"] != "dwtdctsvd"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = embed_configs([grid(32)], out, log=lambda m: None)
    assert [r["defense"] for r in again] == ["dwtdctsvd"]
    assert first["dwtdctsvd"] in {r["key"] for r in json.loads((out / "manifest.json").read_text())["prebuilt"]}
