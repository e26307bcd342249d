"""Worlds as providers (bench/world.py): one spec syntax, legacy spellings, a third world from one file, and the
Stable Diffusion world's real loading path (on the micro-sd architecture, since no SD weights can be fetched here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from markbench import world as W
from markbench.config import load_config
from markbench.errors import UserError
from markbench.plan import build_plan
from tests.conftest import MICRO_TOML, write_config

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_worlds_provide_the_models_the_core_used_to_know():
    assert W.model_names() == {"tiny-sd": "tiny", "tiny-sd-rt": "tiny", "tiny-sd-ind": "tiny", "micro-sd": "micro",
                               "sd-1.4": "sd", "sd-1.5": "sd", "sd-2.1-base": "sd"}


def test_one_spec_syntax_for_prompt_sets_and_datasets():
    from markbench.worlds.tiny import shapes

    held = W.load_prompt_set("tiny:heldout")
    assert len(held) == 64 and len(set(held)) > 1
    # a dataset's name gives its captions where prompts are asked for, and its images where data is
    style_captions = W.load_prompt_set("tiny:style")
    images, captions = W.load_dataset("tiny:style", 4, seed=3)
    arr, ref_captions, _ = shapes.make_dataset("style", 4, seed=3)
    assert captions == list(ref_captions) and all("striped" in c for c in style_captions)
    assert images.shape == (4, 3, 64, 64) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert (images * 255).round().to(int).permute(0, 2, 3, 1).numpy().tolist() == arr.tolist()


@pytest.mark.parametrize("legacy, canonical", [("builtin:tiny", "tiny:heldout"), ("builtin:tiny-train", "tiny:train"),
                                               ("builtin:micro", "micro:shapes"), ("tiny", "tiny:heldout")])
def test_legacy_prompt_spellings_read_the_same_sets(legacy, canonical):
    assert W.load_prompt_set(legacy) == W.load_prompt_set(canonical)


@pytest.mark.parametrize("spec, words", [
    ("tiny:nope", ["tiny:nope", "tiny:heldout"]),
    ("mars:heldout", ["'mars' is no world", "tiny"]),
    ("builtin:nope", ["builtin:nope", "tiny:heldout"]),
])
def test_unknown_prompt_sets_are_one_sentence_naming_what_exists(spec, words):
    with pytest.raises(UserError) as e:
        W.load_prompt_set(spec)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_unknown_dataset_names_the_allowed_ones():
    with pytest.raises(UserError, match="tiny:style") as e:
        W.load_dataset("tiny:sytle", 2)
    assert "did you mean 'style'" in str(e.value)


def test_the_prompts_of_a_config_come_from_its_world(tmp_path):
    canonical = load_config(write_config(tmp_path, MICRO_TOML.replace('set = "micro:shapes"', 'set = "tiny:train"')))
    legacy = load_config(write_config(tmp_path, MICRO_TOML.replace('set = "micro:shapes"', 'builtin = "tiny-train"'),
                                      name="legacy.toml"))
    assert canonical.prompt_list() == legacy.prompt_list() == W.load_prompt_set("tiny:train")


def test_an_unknown_config_prompt_set_is_refused_before_any_model_loads(tmp_path):
    from markbench.errors import ConfigError

    cfg = write_config(tmp_path, MICRO_TOML.replace('set = "micro:shapes"', 'set = "tiny:heldot"'))
    with pytest.raises(ConfigError, match=r"prompts.set = 'tiny:heldot'.*did you mean 'heldout'"):
        load_config(cfg)


def test_fid_reference_reads_a_world_dataset_under_its_new_and_legacy_names():
    assert W.resolve_reference("tiny:heldout") == "tiny:heldout"
    assert W.resolve_reference("tiny_world_heldout") == "tiny:heldout"
    assert W.resolve_reference("clean_base") is None


def test_model_fingerprints_are_unchanged_by_the_move(tmp_path):
    """The keys of every stage (and so every shipped embedding) hash the model as before worlds existed:
    sha256(dtype, 'builtin:<name>:v<version>', the world's identity strings)."""
    import hashlib

    from markbench.config import ModelConfig
    from markbench.models import model_fingerprint
    from markbench.worlds.tiny import fingerprint

    h = hashlib.sha256()
    for part in ("float32", "builtin:tiny-sd-rt:vshipped", fingerprint(), fingerprint("tiny-sd-rt")):
        h.update(part.encode())
    assert model_fingerprint(ModelConfig(builtin="tiny-sd-rt")) == h.hexdigest()
    h = hashlib.sha256()
    for part in ("float32", "builtin:micro-sd:v1"):
        h.update(part.encode())
    assert model_fingerprint(ModelConfig(builtin="micro-sd")) == h.hexdigest()


THIRD_WORLD = '''
"""A world of one file: its own prompt set, dataset and model (a copy of micro-sd's folder)."""
from pathlib import Path
import os

from markbench.world import World, worlds


@worlds.register("moon")
class MoonWorld(World):
    description = "one-file test world"

    def models(self):
        return {"moon-sd": "7"}

    def model_folder(self, name):
        from markbench.worlds.micro import MicroWorld
        return MicroWorld().model_folder("micro-sd")

    def prompt_sets(self):
        return {"craters": lambda: ["a crater"] * 3 + ["two craters"]}

    def datasets(self):
        return ("dust",)

    def load_dataset(self, name, n, seed=0):
        import torch
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, 64, 64, generator=g), [f"dust {i}" for i in range(n)]
'''


@pytest.fixture
def third_world(tmp_path, monkeypatch):
    """A package installed as a distribution whose entry point names a one-file world."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "moonworld.py").write_text(THIRD_WORLD)
    dist = site / "moonworld-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: moonworld\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[bench.worlds]\nmoon = moonworld:MoonWorld\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(W.worlds.group, "loaded", False)
    yield site
    W.worlds._entries.pop("moon", None)
    W._INSTANCES.pop("moon", None)
    sys.modules.pop("moonworld", None)


def test_a_third_world_is_one_file(third_world, tmp_path):
    assert "moon" in W.worlds.names() and W.worlds.origin("moon") == "moonworld 0.3"
    assert W.load_prompt_set("moon:craters") == ["a crater"] * 3 + ["two craters"]
    assert W.load_dataset("moon:dust", 2)[0].shape == (2, 3, 64, 64)
    text = MICRO_TOML.replace('builtin = "micro-sd"', 'builtin = "moon-sd"').replace(
        'set = "micro:shapes"', 'set = "moon:craters"').replace("num_images = 4", "num_images = 4\nseeds = [0]", 0)
    cfg = load_config(write_config(tmp_path, text))
    plan = build_plan(cfg)
    assert cfg.prompt_list()[:1] == ["a crater"] and len(plan.cells) == 2 * 3
    from markbench.models import load_pipeline

    pipe = load_pipeline(cfg.model)
    assert pipe.unet.config.block_out_channels == [32, 64]


def test_bench_ls_worlds_lists_models_sets_and_datasets():
    out = subprocess.run([sys.executable, "-m", "markbench.cli", "ls", "worlds"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("tiny-sd-rt", "micro-sd", "sd-1.5", "tiny:heldout", "tiny:subject", "micro:shapes"):
        assert word in out.stdout


# --------------------------------------------------------------------------------------------------------------
# The Stable Diffusion world: the real loading code, on an SD-architecture folder
# --------------------------------------------------------------------------------------------------------------
def _micro_folder() -> Path:
    from markbench.worlds.micro import MicroWorld

    return MicroWorld().model_folder("micro-sd")


def test_sd_world_loads_a_folder_under_its_root(tmp_path, monkeypatch):
    from markbench.config import ModelConfig
    from markbench.models import load_pipeline, model_fingerprint

    shutil.copytree(_micro_folder(), tmp_path / "sd-1.5")
    monkeypatch.setenv("MARKBENCH_SD_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    cfg = ModelConfig(builtin="sd-1.5")
    pipe = load_pipeline(cfg)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.vae.config.latent_channels == 4
    before = model_fingerprint(cfg)
    (tmp_path / "sd-1.5" / "extra.txt").write_text("changed")
    assert model_fingerprint(cfg) != before  # the folder's files identify the weights


def test_sd_world_finds_a_snapshot_in_the_local_hub_cache(tmp_path, monkeypatch):
    from markbench.models import builtin_folder

    hub = tmp_path / "hub"
    repo = hub / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(_micro_folder(), repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.delenv("MARKBENCH_SD_ROOT", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    folder = builtin_folder("sd-1.5")
    assert folder.resolve() == (repo / "snapshots" / commit).resolve()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_sd_world_without_weights_is_one_sentence_saying_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKBENCH_SD_ROOT", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = write_config(tmp_path, MICRO_TOML.replace('builtin = "micro-sd"', 'builtin = "sd-1.4"'))
    out = subprocess.run([sys.executable, "-m", "markbench.cli", "validate", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**__import__("os").environ, "MARKBENCH_SD_ROOT": str(tmp_path),
                                                     "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "sd-1.4" in err and "CompVis/stable-diffusion-v1-4" in err and "MARKBENCH_SD_ROOT" in err


def test_sd_world_recommends_open_clip_vit_l14(monkeypatch):
    import markbench.measures.clip_score as cs

    seen = {}

    def fake(*args):
        seen["args"] = args
        return type("S", (), {})()

    monkeypatch.setattr(cs, "open_clip_scorer", fake)
    monkeypatch.setattr(cs, "_MODELS", {})
    cs.scorer("sd-world", None, "cpu", 8)
    assert seen["args"] == ("ViT-L-14", "openai", "cpu", 8)
    cs.scorer("sd-world", "/weights/vit-l-14.pt", "cpu", 8)
    assert seen["args"] == ("ViT-L-14", "/weights/vit-l-14.pt", "cpu", 8)
