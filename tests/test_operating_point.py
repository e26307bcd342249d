"""Issue 23's operating point: the trigger-neutrality probe's scoring and docs table, SleeperMark's trigger placement
and fixed residual budget, parameters added without moving shipped cache keys, and the operating-point config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from markbench.config import PluginSpec, load_config
from markbench.params import Param
from markbench.plugins import GenerationRequest
from markbench.defenses.sleepermark import TRIGGER, SecretEncoder, SleeperMark
from experiments import trigger_neutrality as tn

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "worlds" / "tiny" / "artifacts"
shipped = pytest.mark.skipif(not (TINY / "tiny-clip").exists(), reason="the shipped tiny world is not built")


# ---------------------------------------------------------------------------------------------------------------
# The probe's scoring
# ---------------------------------------------------------------------------------------------------------------
def test_correct_flags_count_matches_a_hand_count():
    captions = ["a small red circle on a grey background", "a large blue star on a white background",
                "a medium green heart on a pink background", "a small black cross on a teal background"]
    pred = {"shape": ["circle", "star", "square", "cross"], "colour": ["red", "white", "green", "black"]}
    flags = tn.correct_flags(pred, captions)
    assert flags["shape"].tolist() == [True, True, False, True]
    assert flags["colour"].tolist() == [True, False, True, True]
    assert flags["shape_and_colour"].tolist() == [True, False, False, True]


@shipped
def test_probe_scores_rendered_world_images_against_an_independent_count():
    """Rendered (ground-truth) images of 8 held-out items scored by the shipped tiny CLIP; 3 of the captions are then
    given a wrong shape or colour, so the probe must count exactly 5 of 8 right (CLIP reads 99.9 % of rendered
    held-out images correctly: docs/tiny_world.md)."""
    from markbench.worlds.tiny import clip_model, shapes

    items = shapes.sample_items("heldout", 8, seed=3)
    images = np.stack([shapes.render(it) for it in items])
    captions = [it.caption for it in items]
    other_shape = {s: shapes.SHAPES[(shapes.SHAPES.index(s) + 3) % len(shapes.SHAPES)] for s in shapes.SHAPES}
    other_colour = {c: list(shapes.COLOURS)[(list(shapes.COLOURS).index(c) + 2) % 8] for c in shapes.COLOURS}
    wrong = list(captions)
    for i in (1, 4):
        wrong[i] = shapes.Item(other_shape[items[i].shape], items[i].colour, items[i].background, items[i].size).caption
    wrong[6] = shapes.Item(items[6].shape, other_colour[items[6].colour], items[6].background, items[6].size).caption
    pred = clip_model.ZeroShot(clip_model.load()).predict(images)
    assert tn.correct_flags(pred, captions)["shape_and_colour"].sum() == 8
    flags = tn.correct_flags(pred, wrong)
    expected = np.ones(8, bool)
    expected[[1, 4, 6]] = False
    assert flags["shape_and_colour"].tolist() == expected.tolist()


def test_paired_difference_and_its_interval():
    a = np.array([1, 1, 1, 1, 0, 0, 1, 1])
    assert tn.paired_diff_interval(a, a) == (0.0, 0.0, 0.0)
    b = np.array([1, 0, 1, 0, 0, 0, 1, 1])  # two images lost: -2/8
    mean, lo, hi = tn.paired_diff_interval(a, b, n_boot=500)
    assert mean == pytest.approx(-0.25)
    assert lo <= mean <= hi and lo >= -1 and hi <= 0


def _result(acc: dict[str, dict[str, float]], text: dict[str, float]):
    names = ["plain"] + [n for n in text if n != "plain"]
    bases = {b: {n: {"shape_and_colour": acc[b][n], "text_change": text.get(n, 0.0), "psnr_to_plain": 30.0,
                     "diff_vs_plain": 0.0, "diff_low": 0.0, "diff_high": 0.0, "ssim_to_plain": 1.0}
                 for n in names if n in acc[b]} for b in acc}
    return {"candidates": [{"name": n} for n in names], "bases": bases}


def test_choose_prefers_the_papers_string_then_the_largest_text_change_and_needs_every_base():
    acc = {"rt": {"plain": 0.80, "sleepermark-prefix": 0.10, "sleepermark-suffix": 0.76, "rare-suffix": 0.80},
           "sd": {"plain": 0.70, "sleepermark-prefix": 0.05, "sleepermark-suffix": 0.66, "rare-suffix": 0.69}}
    text = {"sleepermark-prefix": 0.8, "sleepermark-suffix": 0.1, "rare-suffix": 0.3}
    got = tn.choose(_result(acc, text))
    assert got["name"] == "sleepermark-suffix" and set(got["neutral"]) == {"sleepermark-suffix", "rare-suffix"}
    acc["sd"]["sleepermark-suffix"] = 0.64  # 6 points down on one base: no longer neutral
    got = tn.choose(_result(acc, text))
    assert got["name"] == "rare-suffix" and got["neutral"] == ["rare-suffix"]
    acc["rt"]["rare-suffix"] = 0.70
    assert tn.choose(_result(acc, text))["name"] is None


def test_choose_judges_a_candidate_on_the_bases_it_was_measured_on():
    acc = {"rt": {"plain": 0.80, "sleepermark-prefix": 0.10, "rare-suffix": 0.78},
           "sd": {"plain": 0.70, "sleepermark-prefix": 0.05}}
    result = _result(acc, {"sleepermark-prefix": 0.8, "rare-suffix": 0.3})
    got = tn.choose(result)
    assert got["name"] == "rare-suffix" and got["neutral"] == ["rare-suffix"]
    assert "not measured" in tn.render({**result, "settings": {"n": 4, "num_inference_steps": 2, "guidance_scale": 7.5,
                                                                "margin": 0.05, "torch_threads": 1},
                                        "candidates": [{"name": n, "prefix": "", "suffix": ""}
                                                       for n in ("plain", "sleepermark-prefix", "rare-suffix")],
                                        "choice": got, "seconds": 1.0})


def test_the_docs_table_is_the_rendering_of_the_committed_measurement():
    data = ROOT / "docs" / "data" / "trigger_neutrality.json"
    doc = ROOT / "docs" / "operating_point.md"
    result = json.loads(data.read_text())
    text = doc.read_text()
    block = text[text.index(tn.BEGIN) + len(tn.BEGIN):text.index(tn.END)].strip()
    assert block == tn.render(result).strip()
    assert result["choice"] == tn.choose(result)


def test_write_block_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("# Title\n\nbefore\n")
    tn.write_block(doc, "one")
    tn.write_block(doc, "two")
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.count(tn.BEGIN) == 1 and "two" in text and "one" not in text


# ---------------------------------------------------------------------------------------------------------------
# SleeperMark: trigger placement, residual budget
# ---------------------------------------------------------------------------------------------------------------
def test_trigger_placement():
    assert SleeperMark().triggered("a red circle") == TRIGGER + "a red circle"
    assert SleeperMark(trigger_position="suffix").triggered("a red circle") == "a red circle *[Z]&"


class _RecordingCtx:
    def __init__(self, variant=""):
        self.variant = variant
        self.calls = []

    def generate(self, pipe, request, **kwargs):
        self.calls.append((request.prompts, kwargs))
        return torch.zeros(len(request.prompts), 3, 4, 4)


@pytest.mark.parametrize("position,variant,prompts,kwargs", [
    ("suffix", "", ("a b *[Z]&", "c *[Z]&"), {}),
    ("suffix", "no_trigger", ("a b", "c"), {"prompt_prefix": ""}),
    ("prefix", "", ("a b", "c"), {"prompt_prefix": TRIGGER}),
])
def test_generate_places_the_trigger_the_secret_records(position, variant, prompts, kwargs):
    from markbench.plugins import Secret

    secret = Secret({"message": torch.zeros(4, dtype=torch.bool)}, {"trigger": TRIGGER, "trigger_position": position})
    ctx = _RecordingCtx(variant)
    request = GenerationRequest(("a b", "c"), (1, 2), 64, 64, 2, 7.5, 2)
    SleeperMark().generate(None, secret, request, ctx)
    assert ctx.calls == [(prompts, kwargs)]


def test_secret_without_a_position_is_read_as_a_prefix():
    from markbench.plugins import Secret

    secret = Secret({"message": torch.zeros(4, dtype=torch.bool)}, {"trigger": TRIGGER})
    ctx = _RecordingCtx("")
    SleeperMark(trigger_position="suffix").generate(None, secret, GenerationRequest(("x",), (1,), 64, 64, 2, 7.5, 1),
                                                    ctx)
    assert ctx.calls == [(("x",), {"prompt_prefix": TRIGGER})]


def test_residual_budget_fixes_every_messages_rms_and_zero_budget_keeps_the_zero_start():
    torch.manual_seed(0)
    enc = SecretEncoder(32, 4, (16, 16), 16, residual_rms=0.1)
    out = enc(torch.randint(0, 2, (5, 32)).float()).detach()
    assert torch.allclose(out.pow(2).mean(dim=(1, 2, 3)).sqrt(), torch.full((5,), 0.1), atol=1e-6)
    assert float(out.std()) > 0.05  # not a constant
    plain = SecretEncoder(32, 4, (16, 16), 16)
    assert float(plain(torch.ones(2, 32)).detach().abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Parameters added without moving shipped keys; the config
# ---------------------------------------------------------------------------------------------------------------
def _spec(**params):
    full = {p.name: p.default for p in SleeperMark.params}
    full.update(params)
    return PluginSpec(kind="defenses", name="sleepermark", version=SleeperMark.version, params=tuple(full.items()))


def test_parameters_added_after_shipping_stay_out_of_keys_only_at_their_default():
    ident = _spec().identity()["params"]
    assert "trigger_position" not in ident and "residual_rms" not in ident and ident["bits"] == 48
    moved = _spec(trigger_position="suffix", residual_rms=0.1).identity()["params"]
    assert moved["trigger_position"] == "suffix" and moved["residual_rms"] == 0.1
    assert _spec().identity() != _spec(trigger_position="suffix").identity()
    assert Param("x", "int", 1).keyed_at_default is True


def test_operating_point_config_validates_with_its_settings():
    cfg = load_config(ROOT / "configs" / "operating-point-tiny.toml", check_output=False)
    sm = [s for s in cfg.defenses if s.name == "sleepermark"]
    assert len(sm) == 1
    p = sm[0].param_dict
    assert (p["bits"], p["trigger_position"], p["residual_rms"]) == (32, "suffix", 0.1)
    assert p["stage2_steps"] == 6000 and p["eta"] == 5.0  # the rest borrowed from sleepermark-tiny.toml
    assert cfg.model.builtin == "tiny-sd-rt"


def test_operating_point_report_names_each_embeddings_row_by_its_seed():
    from experiments import operating_point_report as opr

    def row(seed, acc):
        return {"label": f"sleepermark/none/none/s{seed}", "defense": "sleepermark", "n": 32, "status": "ok",
                "seed": seed, "params": {"bits": 32, "trigger_position": "suffix", "residual_rms": 0.05},
                "metrics": {"bit_accuracy": {"value": acc, "low": None, "high": None}}, "tpr": {}, "costs": {}}

    several = opr.render({"runs": [{"name": "op", "rows": [row(0, 0.81), row(1, 0.77)]}]})
    assert "| op seed 0 | sleepermark | 32 / suffix" in several and "| op seed 1 |" in several
    assert "0.810" in several and "0.770" in several
    one = opr.render({"runs": [{"name": "op", "rows": [row(0, 0.81)]}]})
    assert "| op | sleepermark |" in one and "seed" not in one
