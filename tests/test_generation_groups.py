"""Generation shared across cells (``run.batch_across_cells``, issue 30): with every batch exactly ``batch_size``
(the last padded), an image's pixels do not depend on the images beside it, so merging the generations of several
cells into shared batches gives each cell the images it gets alone, bit for bit."""

from __future__ import annotations

import pytest
import torch

from markbench.config import load_config
from markbench.generation import generate_images
from markbench.plan import build_plan
from markbench.plugins import GenerationRequest
from markbench.runner import Runner
from markbench.store import ResultStore
from markbench.testing import micro_pipeline

from .conftest import MICRO_TOML, write_config

PROMPTS = ("a red circle on a blue background", "a green square on a white background",
           "a yellow star on a black background", "a blue triangle on a grey background",
           "a purple cross on a yellow background")
SEEDS = (11, 22, 33, 44, 55)


def _req(idx, batch, pad=True):
    return GenerationRequest(prompts=tuple(PROMPTS[i] for i in idx), seeds=tuple(SEEDS[i] for i in idx), height=64,
                             width=64, num_inference_steps=2, guidance_scale=7.5, batch_size=batch, pad_to_batch=pad)


def test_an_image_in_a_full_batch_is_the_same_whatever_its_position_and_companions():
    pipe = micro_pipeline()
    a = generate_images(pipe, _req([0, 1, 2, 3], 4))
    b = generate_images(pipe, _req([2, 0, 4, 1], 4))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and torch.equal(a[1], b[3])
    # a short last batch padded to the full size gives the full batch's pixels
    short = generate_images(pipe, _req([0, 1, 2, 3, 4], 4))
    alone = generate_images(pipe, _req([4], 4))
    assert short.shape[0] == 5 and torch.equal(short[4], alone[0]) and torch.equal(short[:4], a)


def test_without_padding_a_short_batch_is_sampled_at_its_own_size():
    """The default path is unchanged: a last batch of 1 runs as a batch of 1 (the pixels the existing cache keys
    describe)."""
    pipe = micro_pipeline()
    unpadded = generate_images(pipe, _req([0, 1, 2, 3, 4], 4, pad=False))
    alone = generate_images(pipe, _req([4], 1, pad=False))
    assert torch.equal(unpadded[4], alone[0])


def _grid(tmp_path, name, merged_option: bool | None = True):
    text = MICRO_TOML.replace("seeds = [0]", "seeds = [0, 1]").replace("num_images = 4", "num_images = 3")
    if merged_option is not None:
        text = text.replace("batch_size = 4", "batch_size = 4\nbatch_across_cells = " + str(merged_option).lower())
    (tmp_path / name).mkdir()
    return load_config(write_config(tmp_path / name, text))


def _values(cfg):
    store = ResultStore(cfg.output / "results.sqlite")
    df = store.dataframe()
    store.close()
    return {(r.cell, r.metric): (r.value, r.low, r.high) for r in df.itertuples()}


@pytest.mark.slow
def test_merged_generation_gives_every_cell_the_images_and_numbers_it_gets_alone(tmp_path, monkeypatch):
    """Two run seeds: the base model samples two prompt lists with the same settings, so their generations share
    batches. The same grid with the grouping switched off (same keys) stores the same images and numbers."""
    cfg = _grid(tmp_path, "merged")
    plan = build_plan(cfg)
    gens = [s for s in plan.stages.values() if s.kind == "generate" and s.plugin is None]
    assert all(dict(s.extra)["request"]["padded"] for s in gens)
    merged_summary = Runner(cfg).run()
    assert merged_summary.cells_failed == []
    metas = {s.key: Runner(cfg).artifacts.meta(s.key) for s in gens}
    assert any(m.get("batched_with", 1) > 1 for m in metas.values())

    alone_cfg = _grid(tmp_path, "alone")
    monkeypatch.setattr(Runner, "_generation_group", lambda self, stage, env: None)
    assert Runner(alone_cfg).run().cells_failed == []
    a, b = Runner(cfg).artifacts, Runner(alone_cfg).artifacts
    for s in gens:
        assert "batched_with" not in b.meta(s.key)
        assert torch.equal(a.images(s.key), b.images(s.key)), s.label
    assert _values(cfg) == _values(alone_cfg)


def test_the_option_is_off_by_default_and_then_no_key_changes(tmp_path):
    on, off, default = _grid(tmp_path, "on"), _grid(tmp_path, "off", False), _grid(tmp_path, "default", None)
    assert default.run.batch_across_cells is False
    keys_off = {s.key for s in build_plan(off).stages.values()}
    assert keys_off == {s.key for s in build_plan(default).stages.values()}
    gen_on = {s.key for s in build_plan(on).stages.values() if s.kind == "generate"}
    assert not gen_on & keys_off  # padded generations are other images: other keys


@pytest.mark.parametrize("bad", ['"yes"', "1"])
def test_a_non_boolean_option_is_one_sentence(tmp_path, bad):
    from markbench.errors import ConfigError

    text = MICRO_TOML.replace("batch_size = 4", f"batch_size = 4\nbatch_across_cells = {bad}")
    with pytest.raises(ConfigError, match="batch_across_cells"):
        load_config(write_config(tmp_path, text))
