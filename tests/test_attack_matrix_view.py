"""The attack-matrix view of a results file (reports/attack_matrix.py): `view=attacks` blocks of docs/*.md."""

from __future__ import annotations

import json

import pytest

from markbench.reports.attack_matrix import cost_text, render_attacks
from markbench.reports.readme import update_docs


def _v(value, low=None, high=None, n=32):
    return {"value": value, "low": low, "high": high, "n": n}


def _cell(d, a, metric, value, low=None, high=None, n=32):
    return {"defense_label": d, "model_attack_label": "none", "image_attack_label": a, "seed": 0, "metric": metric,
            "value": value, "low": low, "high": high, "n": n}


def _board():
    cells = [
        # listed out of the grid's order: the view follows the grid
        _cell("bits", "regen", "bit_accuracy", 0.6, 0.55, 0.65), _cell("bits", "regen", "tpr@0.01", 0.25, 0.1, 0.4),
        _cell("bits", "regen", "auc", 0.7, 0.6, 0.8), _cell("bits", "regen", "psnr_attack", 27.74),
        _cell("bits", "regen", "ssim_attack", 0.8991), _cell("bits", "regen", "clip_score", 60.0, 58.0, 62.0),
        _cell("bits", "regen", "clip_score_watermark", 80.0),
        _cell("bits", "none", "bit_accuracy", 0.99, 0.98, 1.0), _cell("bits", "none", "tpr@0.01", 1.0, 0.891, 1.0),
        # a score defence: no analytic TPR, the empirical one its negatives resolve
        _cell("score", "none", "tpr@fpr<=1/32", 0.75, 0.57, 0.89), _cell("score", "none", "auc", 0.9, 0.8, 1.0),
        _cell("other", "none", "bit_accuracy", 0.5, 0.4, 0.6),
    ]
    attacker = [{"defense_label": "bits", "model_attack_label": "none", "image_attack_label": "regen", "seed": 0,
                 "joint_evasion": {"1e-06": _v(0.9), "0.01": _v(0.5, 0.3, 0.7)}, "quality_kept": _v(0.75, 0.6, 0.9),
                 "content_kept": _v(1.0), "cost": {"seconds": 3.2, "images": 32, "seconds_per_image": 0.1,
                                                   "model_evals": 64, "attacker_images": 0,
                                                   "surrogate": {"attacker_images": 128, "seconds": 41.6,
                                                                 "train_accuracy": 0.55}}}]
    forgery = [{"defense_label": "bits", "model_attack_label": "none", "image_attack_label": "forge", "seed": 0,
                "status": "ok", "forged_fpr": {"1e-06": _v(0.5, 0.3, 0.7), "0.01": _v(1.0, 0.891, 1.0)},
                "clean_fpr": {"1e-06": _v(0.0, 0.0, 0.109), "0.01": _v(0.03125, 0.001, 0.162)},
                "psnr": _v(26.71), "ssim": _v(0.8), "joint_forgery": {"0.01": _v(0.3125, 0.16, 0.5)},
                "cost": {"seconds_per_image": 0.0226, "attacker_images": 32}},
               {"defense_label": "other", "model_attack_label": "none", "image_attack_label": "forge", "seed": 0,
                "status": "error", "forged_fpr": {}, "clean_fpr": {}, "psnr": None, "ssim": None,
                "joint_forgery": {}, "cost": {}}]
    return {"kind": "markbench-leaderboard", "metric": "tpr@0.01", "negatives": "attacked", "n_images": 32,
            "generated": "2026-01-01T00:00:00Z", "source": {"config_path": "configs/a.toml", "git_hash": "abc"},
            "grid": {"seeds": [0], "defenses": ["score", "bits", "other"], "model_attacks": ["none"],
                     "image_attacks": ["none", "regen", "forge"]},
            "entries": [], "cells": cells, "attacker": attacker, "forgery": forgery}


def _table(text: str, title: str) -> list[str]:
    part = text.split(f"#### {title}")[1].split("####")[0]
    return [line for line in part.splitlines() if line.startswith("| ") and not line.startswith(("| defence", "| ---"))]


def test_removal_rows_follow_the_grid_and_compute_the_clip_change_from_the_file():
    text = render_attacks(_board(), "results/a.json", {}, "view=attacks")
    rows = _table(text, "Removal")
    assert [r.split(" | ")[0][2:] + "/" + r.split(" | ")[2] for r in rows] == [
        "score/none", "bits/none", "bits/regen", "other/none"]
    assert rows[2] == ("| bits | none | regen | 32 | 0.600 [0.550, 0.650] | 0.250 [0.100, 0.400] | 0.700 [0.600, "
                       "0.800] | 27.7 | 0.899 | 60.000 [58.000, 62.000] | -25.0 % |")
    # the score defence's TPR is the empirical one, named in its row and explained above the table
    assert "| score | none | none | 32 | - | 0.750 [0.570, 0.890] (`tpr@fpr<=1/32`) | 0.900 [0.800, 1.000] |" in rows[0]
    assert "`tpr@fpr<=1/32`: TPR at" in text and "`tpr@0.01`: TPR at the analytic binomial threshold" in text


def test_joint_and_forgery_tables_read_the_rates_at_1e_2_and_the_recorded_costs():
    text = render_attacks(_board(), "results/a.json", {}, "view=attacks")
    assert _table(text, "Joint success and cost (removal)") == [
        "| bits | none | regen | 0.500 [0.300, 0.700] | 0.750 [0.600, 0.900] | 1.000 | 100.0 ms/image, 64 model evals, "
        "0 attacker images, surrogate: 128 images, 42 s, training accuracy 0.55 |"]
    assert _table(text, "Forgery (clean images made to read as marked)") == [
        "| bits | none | forge | 32 | 1.000 [0.891, 1.000] | 0.031 [0.001, 0.162] | 0.500 [0.300, 0.700] | "
        "0.312 [0.160, 0.500] | 26.7 | 0.800 | 22.6 ms/image, 32 attacker images |"]
    assert "Not finished: other/forge (error)" in text


def test_a_selection_keeps_only_its_cells_in_every_table():
    text = render_attacks(_board(), "results/a.json", {"defenses": ["score"]}, "view=attacks")
    assert len(_table(text, "Removal")) == 1 and "Joint success" not in text and "#### Forgery" not in text
    assert text.startswith("<!-- results:begin source=results/a.json view=attacks defenses=score -->")
    assert "Not finished" not in text  # other's failed forgery is not selected


@pytest.mark.parametrize("cost, text", [({}, "-"), ({"seconds_per_image": 0.0005}, "0.5 ms/image"),
                                        ({"surrogate": {"attacker_images": 64, "seconds": 9.4}},
                                         "surrogate: 64 images, 9 s")])
def test_cost_text_says_only_what_was_recorded(cost, text):
    assert cost_text(cost) == text


def test_attacks_block_is_rewritten_from_its_file_and_then_up_to_date(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text(json.dumps(_board()))
    doc = tmp_path / "docs" / "a.md"
    doc.parent.mkdir()
    doc.write_text("# A\n<!-- results:begin source=results/a.json view=attacks -->\nOLD | 0.999\n<!-- results:end -->\n")
    assert not update_docs(doc, tmp_path) and update_docs(doc, tmp_path, check=True)
    text = doc.read_text()
    assert "OLD" not in text and "| bits | none | regen | 32 | 0.600 [0.550, 0.650] |" in text
    assert text.count("<!-- results:end -->") == 1


def test_several_seeds_get_a_row_each_named_by_their_seed():
    board = _board()
    seed1 = [dict(c, seed=1, value=0.42, low=0.40, high=0.44) for c in board["cells"]
             if c["defense_label"] == "bits" and c["image_attack_label"] == "none"]
    board["cells"] = board["cells"] + seed1
    rows = _table(render_attacks(board, "results/a.json", {"defenses": ["bits"]}, "view=attacks"), "Removal")
    assert [r.split(" | ")[0] + " | " + r.split(" | ")[2] for r in rows] == [
        "| bits (seed 0) | none", "| bits (seed 1) | none", "| bits (seed 0) | regen"]
    assert rows[1].split(" | ")[4] == "0.420 [0.400, 0.440]"  # seed 1's own numbers, not overwritten by seed 0's
