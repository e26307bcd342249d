"""The artifact cache checks what it reads: sizes and SHA-256 recorded at write time, damaged entries quarantined
(moved aside, not deleted), old entries without records still readable, read-only stores never changed; and the
`bench cache` commands (verify, du, prune)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from markbench.cache import ArtifactStore, CorruptArtifact, stable_hash
from markbench.cli import main


def _images(n=3, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _entry(store, name="a", images=True):
    key = stable_hash(name)
    store.write(key, meta={"kind": "generate" if images else "embed"},
                tensors=None if images else {"secret.w": torch.arange(10.0)},
                images=_images() if images else None)
    return key


def test_write_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    store = ArtifactStore(tmp_path)
    key = _entry(store)
    files = store.meta(key)["files"]
    assert sorted(files) == ["images/00000.png", "images/00001.png", "images/00002.png"]
    for name, rec in files.items():
        data = (store.path(key) / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", ["meta_not_json", "meta_missing_file", "png_garbage_same_size", "png_truncated",
                                    "tensors_truncated", "tensors_flipped_byte", "meta_is_a_list"])
def test_damaged_entry_is_detected_and_quarantined_not_deleted(tmp_path, damage):
    store = ArtifactStore(tmp_path)
    key = _entry(store, images=not damage.startswith("tensors"))
    root = store.path(key)
    png = root / "images" / "00001.png"
    tens = root / "tensors.safetensors"
    if damage == "meta_not_json":
        (root / "meta.json").write_text("{not json")
    elif damage == "meta_is_a_list":
        (root / "meta.json").write_text("[1, 2]")
    elif damage == "meta_missing_file":
        png.unlink()
    elif damage == "png_garbage_same_size":
        png.write_bytes(os.urandom(png.stat().st_size))
    elif damage == "png_truncated":
        png.write_bytes(png.read_bytes()[:40])
    elif damage == "tensors_truncated":
        tens.write_bytes(tens.read_bytes()[:-7])
    else:
        data = bytearray(tens.read_bytes())
        data[-1] ^= 0xFF
        tens.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact) as e:
        store.check(key)
        store.tensors(key)
        store.images(key)
    assert key in str(e.value.path) and not e.value.readonly
    moved = store.quarantine(key)
    assert not store.exists(key)  # recomputed next time
    assert moved.parent == tmp_path / "quarantine" and (moved / "meta.json").exists()  # kept, not deleted


def test_old_entry_without_records_is_read_and_checked_for_what_can_be_checked(tmp_path):
    store = ArtifactStore(tmp_path)
    key = _entry(store)
    meta_file = store.path(key) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))
    ref = _images()
    assert torch.equal(store.images(key), (ref * 255).round() / 255)  # readable
    store.check(key)
    (store.path(key) / "images" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(CorruptArtifact, match="00002.png is not a readable PNG"):
        store.images(key)


def test_read_only_fallback_is_never_moved(tmp_path, monkeypatch, capsys):
    shipped = ArtifactStore(tmp_path / "shipped")
    key = _entry(shipped, images=False)
    tens = shipped.path(key) / "tensors.safetensors"
    tens.write_bytes(tens.read_bytes()[:-3])
    store = ArtifactStore(tmp_path / "cache", fallbacks=(tmp_path / "shipped",))
    with pytest.raises(CorruptArtifact) as e:
        store.check(key)
    assert e.value.readonly and "shipped (read-only)" in str(e.value)
    assert store.quarantine(key) is None and tens.exists()  # quarantine only ever moves the writable copy
    import markbench.cache

    monkeypatch.setattr(markbench.cache, "shipped_stores", lambda: (tmp_path / "shipped",))
    rc = main(["cache", "verify", "--cache", str(tmp_path / "cache")])
    assert rc == 1 and tens.exists() and "damaged (shipped, read-only, left as is" in capsys.readouterr().out


def test_shipped_prebuilt_store_verifies_and_is_untouched():
    from markbench.worlds.tiny import PREBUILT

    if not PREBUILT.is_dir():
        pytest.skip("no prebuilt store shipped")
    before = {p: p.stat().st_mtime_ns for p in PREBUILT.rglob("*")}
    ro = ArtifactStore(PREBUILT)
    keys = [k for k, _ in ro.entries()]
    assert keys
    for k in keys:  # no hashes recorded there: parseable meta, loadable tensors
        ro.check(k)
        assert ro.tensors(k)
    assert {p: p.stat().st_mtime_ns for p in PREBUILT.rglob("*")} == before


def test_cache_verify_du_prune_commands(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    good = _entry(store, "good")
    bad = _entry(store, "bad")
    old = _entry(store, "old", images=False)
    (store.path(bad) / "images" / "00000.png").write_bytes(b"junk")
    (tmp_path / good[:2] / ".tmp-abandoned").mkdir()
    assert main(["cache", "verify", "--cache", str(tmp_path), "--keep"]) == 1
    assert store.exists(bad)
    assert main(["cache", "verify", "--cache", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: cache entry {tmp_path / bad[:2] / bad}" in out and "3 entries, 1 damaged" in out
    assert not store.exists(bad) and store.exists(good)
    assert main(["cache", "verify", "--cache", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["cache", "du", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "generate" in out and "embed" in out and "quarantine" in out
    past = time.time() - 10 * 86400
    os.utime(store.path(old), (past, past))
    os.utime(tmp_path / good[:2] / ".tmp-abandoned", (past, past))
    assert main(["cache", "prune", "--cache", str(tmp_path), "--older-than", "7d", "--dry-run"]) == 0
    assert store.exists(old)
    assert main(["cache", "prune", "--cache", str(tmp_path), "--older-than", "7d"]) == 0
    assert not store.exists(old) and store.exists(good) and not (tmp_path / good[:2] / ".tmp-abandoned").exists()
    assert main(["cache", "prune", "--cache", str(tmp_path), "--quarantine"]) == 0
    assert not any((tmp_path / "quarantine").iterdir())


def test_prune_unused_by_keeps_exactly_the_configs_stages(tmp_path, micro_config, capsys):
    from markbench.config import load_config
    from markbench.plan import build_plan

    cfg = load_config(micro_config, {"run.cache": str(tmp_path / "c")})
    used = [k for k, s in build_plan(cfg).stages.items() if s.kind == "generate"][0]
    store = ArtifactStore(tmp_path / "c")
    store.write(used, meta={"kind": "generate"}, images=_images())
    stray = _entry(store, "stray")
    rc = main(["cache", "prune", "--config", str(micro_config), "--set", f"run.cache={tmp_path / 'c'}",
               "--unused-by", str(micro_config), "--set", f"run.cache={tmp_path / 'c'}"])
    assert rc == 0 and store.exists(used) and not store.exists(stray)


def test_concurrent_quarantine_of_one_key_is_harmless(tmp_path):
    store = ArtifactStore(tmp_path)
    key = _entry(store)
    assert store.quarantine(key) is not None
    assert store.quarantine(key) is None  # the other process got there first
    shutil.rmtree(tmp_path / "quarantine")


def test_prune_quarantine_alone_empties_the_quarantine_and_keeps_every_entry(tmp_path, capsys):
    """`bench cache prune --quarantine` (the help's "delete quarantined entries") used to delete every entry of the
    cache too: without --older-than or --unused-by no entry is a candidate."""
    store = ArtifactStore(tmp_path)
    keys = [_entry(store, "a"), _entry(store, "b", images=False), _entry(store, "bad")]
    (store.path(keys[2]) / "images" / "00000.png").write_bytes(b"junk")
    assert main(["cache", "verify", "--cache", str(tmp_path)]) == 1  # quarantines the damaged one
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    capsys.readouterr()
    assert main(["cache", "prune", "--cache", str(tmp_path), "--quarantine", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would remove") == 1 and "quarantine" in out
    assert main(["cache", "prune", "--cache", str(tmp_path), "--quarantine"]) == 0
    assert not any((tmp_path / "quarantine").iterdir())
    assert store.exists(keys[0]) and store.exists(keys[1]) and not store.exists(keys[2])
    store.verify(keys[0])
    store.verify(keys[1])


def test_files_and_folders_that_are_not_entries_are_never_reported_or_pruned(tmp_path, capsys):
    """A user's notes, a stray folder inside a shard, a folder whose name is a key of another shard, symbolic links:
    not entries. `verify` does not call them damaged (nor move them), `prune` never removes them."""
    store = ArtifactStore(tmp_path)
    key = _entry(store, "a")
    (tmp_path / "NOTES.txt").write_text("mine")
    (tmp_path / "zz" / "notanentry").mkdir(parents=True)
    (tmp_path / "ab" / ("c" * 64)).mkdir(parents=True)  # a key-shaped name in the wrong shard
    (tmp_path / "ab" / "stray.bin").write_bytes(b"x")
    (tmp_path / "lo").symlink_to(tmp_path / "lo")
    strays = [tmp_path / "NOTES.txt", tmp_path / "zz" / "notanentry", tmp_path / "ab" / ("c" * 64),
              tmp_path / "ab" / "stray.bin"]
    assert [k for k, _ in store.entries()] == [key]
    assert main(["cache", "verify", "--cache", str(tmp_path)]) == 0
    assert "1 entries, 0 damaged" in capsys.readouterr().out
    past = time.time() - 10 * 86400
    for p in strays + [store.path(key)]:
        os.utime(p, (past, past))
    assert main(["cache", "prune", "--cache", str(tmp_path), "--older-than", "1d"]) == 0
    assert not store.exists(key) and all(p.exists() for p in strays)


def test_a_quarantine_path_that_is_a_file_is_one_sentence_not_a_traceback(tmp_path, capsys):
    """A damaged entry must be set aside into <cache>/quarantine; when that path is a file, verify (and a run that
    heals) say so in one line and exit 2 (an audit found a FileExistsError traceback); the entry stays."""
    store = ArtifactStore(tmp_path)
    bad = _entry(store, "bad")
    (store.path(bad) / "images" / "00000.png").write_bytes(b"junk")
    (tmp_path / "quarantine").write_text("a user's file")
    capsys.readouterr()
    assert main(["cache", "verify", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quarantine: is not a folder" in err and "Traceback" not in err
    assert store.exists(bad) and (tmp_path / "quarantine").read_text() == "a user's file"
