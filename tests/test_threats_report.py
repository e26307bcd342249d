"""The threat-tier views of a results file (reports/threats.py): `view=threats` and `view=threats-verdict` blocks."""

from __future__ import annotations

import json

from markbench.reports.readme import doc_files, update, update_docs
from markbench.reports.threats import rows, tier_of, verdicts


def _cell(d, m, metric, v, lo=None, hi=None, n=8):
    return {"defense_label": d, "model_attack_label": m, "image_attack_label": "none", "seed": 0, "metric": metric,
            "value": v, "low": lo, "high": hi, "n": n}


def _board():
    cells = [
        _cell("mark", "none", "tpr@1e-06", 1.0, 0.631, 1.0), _cell("mark", "none", "bit_accuracy", 0.99, 0.98, 1.0),
        _cell("mark", "none", "random_trigger_wake@1e-06", 0.9375, 0.698, 0.998, 16),
        _cell("mark[no_trigger]", "none", "fid", 100.0, 90, 110), _cell("mark[no_trigger]", "none", "clip_score", 62.0),
        # blind fine-tune: breaks the mark and the model (FID 3 x)
        _cell("mark", "finetune(lr=0.001)", "tpr@1e-06", 0.0, 0.0, 0.369),
        _cell("mark[no_trigger]", "finetune(lr=0.001)", "fid", 300.0), _cell("mark[no_trigger]", "finetune(lr=0.001)",
                                                                            "clip_score", 20.0),
        # trigger known: breaks the mark, the model stays within the bar (110 <= 125, 60 >= 55.8)
        _cell("mark", "unlearn(steps=100)", "tpr@1e-06", 0.125, 0.003, 0.527),
        _cell("mark[no_trigger]", "unlearn(steps=100)", "fid", 110.0),
        _cell("mark[no_trigger]", "unlearn(steps=100)", "clip_score", 60.0),
        # method known: does not break it
        _cell("mark", "prompt_sanitise", "tpr@1e-06", 0.875, 0.473, 0.997),
        _cell("mark[no_trigger]", "prompt_sanitise", "fid", 100.0),
        _cell("mark[no_trigger]", "prompt_sanitise", "clip_score", 62.0),
        # a score defence: read at the empirical threshold its negatives resolve
        _cell("zb", "none", "tpr@fpr<=1/8", 0.75, 0.349, 0.968), _cell("zb", "none", "auc", 0.9, 0.8, 1.0),
    ]
    return {"kind": "markbench-leaderboard", "metric": "tpr@1e-06", "negatives": "attacked", "n_images": 8,
            "generated": "2026-01-01T00:00:00Z", "source": {"config_path": "configs/t.toml", "git_hash": "abc"},
            "grid": {"seeds": [0], "defenses": ["mark", "mark[no_trigger]", "zb", "zb[no_trigger]"],
                     "model_attacks": ["none", "unlearn(steps=100)", "finetune(lr=0.001)", "prompt_sanitise"],
                     "image_attacks": ["none"]},
            "entries": [], "cells": cells,
            "model_attacks": [{"defense_label": "mark", "model_attack_label": "unlearn(steps=100)", "seed": 0,
                               "tier": "trigger_known", "cost": {"steps": 100, "seconds": 61.4}},
                              {"defense_label": "mark", "model_attack_label": "prompt_sanitise", "seed": 0,
                               "tier": "method_known", "cost": {"search_found": "ab cd", "search_claimed": True}}]}


def test_tier_is_read_from_the_registry_by_the_labels_plugin_name():
    assert (tier_of("finetune(lr=0.001,steps=100)"), tier_of("prompt_sanitise"), tier_of("unlearn(steps=1) a1"),
            tier_of("none"), tier_of("no_such_attack")) == ("blind", "method_known", "trigger_known", "", "?")


def test_rows_compute_evasion_intervals_usability_and_the_joint_rate_from_the_file():
    recs = {(r["defense"], r["model_attack"]): r for r in rows(_board())}
    # ordered by tier: none, blind, method known, trigger known
    assert [r["model_attack"] for r in rows(_board()) if r["defense"] == "mark"] == [
        "none", "finetune(lr=0.001)", "prompt_sanitise", "unlearn(steps=100)"]
    u = recs[("mark", "unlearn(steps=100)")]
    assert u["evasion"]["value"] == 0.875 and u["evasion"]["low"] == 1 - 0.527 and u["evasion"]["high"] == 1 - 0.003
    assert u["usable"] is True and recs[("mark", "finetune(lr=0.001)")]["usable"] is False
    assert recs[("mark", "none")]["wake"]["value"] == 0.9375
    assert recs[("zb", "none")]["metric"] == "tpr@fpr<=1/8"  # no analytic TPR: the empirical one


def test_threats_block_is_generated_idempotent_and_states_the_bar(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.json").write_text(json.dumps(_board()))
    doc = tmp_path / "docs" / "t.md"
    doc.parent.mkdir()
    doc.write_text("# T\n<!-- results:begin source=results/t.json view=threats -->\nOLD\n<!-- results:end -->\n"
                   "<!-- results:begin source=results/t.json view=threats-verdict defenses=mark -->\n"
                   "<!-- results:end -->\n")
    assert not update_docs(doc, tmp_path) and update_docs(doc, tmp_path, check=True)
    text = doc.read_text()
    assert "OLD" not in text and "at most 1.25 x" in text
    assert ("| mark | unlearn(steps=100) | trigger_known | 8 | 0.125 [0.003, 0.527] | 0.875 [0.473, 0.997] | - | - | "
            "110.0 | 60.0 | yes | 0.875 [0.473, 0.997] | 100 steps, 61 s |") in text
    assert "| mark | finetune(lr=0.001) | blind | 8 | 0.000 [0.000, 0.369] | 1.000 [0.631, 1.000] | - | - | 300.0 | " \
           "20.0 | no | 0 (not usable) | - |" in text
    assert "| mark | none | - | 8 | 1.000 [0.631, 1.000] | 0.000 [0.000, 0.369] | 0.990 [0.980, 1.000] | " \
           "0.938 [0.698, 0.998] |" in text
    assert "| zb | none | - | 8 | 0.750 [0.349, 0.968] (`tpr@fpr<=1/8`) |" in text
    assert "with the model still usable by `unlearn(steps=100)` (trigger_known" in text
    assert "only at the price of an unusable model by `finetune(lr=0.001)` (blind" in text
    assert "Not broken by `prompt_sanitise` (method_known: TPR 0.88" in text
    assert "| found 'ab cd' (claimed) |" in text  # what a search found, from the recorded cost
    assert "The lowest tier that breaks it and leaves a usable model: `trigger_known`." in text
    assert "**zb**" not in text.split("view=threats-verdict")[1]  # the selection keeps one defence


def test_verdict_says_when_nothing_breaks_the_mark():
    board = _board()
    board["cells"] = [c for c in board["cells"] if c["model_attack_label"] in ("none", "prompt_sanitise")]
    (v,) = verdicts(board, {"defenses": ["mark"]})
    assert "not broken by any attack of the grid" in v and "prompt_sanitise" in v and "lowest tier" not in v


def test_readme_source_blocks_are_generated_and_the_leaderboard_block_is_left_to_update(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.json").write_text(json.dumps(_board()))
    lb = {"kind": "markbench-leaderboard", "metric": "tpr@1e-06", "grid": {"seeds": [0]}, "entries": []}
    (tmp_path / "lb.json").write_text(json.dumps(lb))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:begin source=results/t.json view=threats-verdict -->\nKEEP\n<!-- results:end -->\n"
                      "<!-- results:begin -->\nLB\n<!-- results:end -->\n")
    assert doc_files(tmp_path) == [readme]
    update(readme, tmp_path / "lb.json")  # the leaderboard block, not the first (source=) block
    text = readme.read_text()
    assert "KEEP" in text and "LB" not in text
    update_docs(readme, tmp_path)
    assert "KEEP" not in readme.read_text() and "**mark**" in readme.read_text()


def test_a_prompt_filtering_service_is_not_counted_as_breaking_the_mark():
    """prompt_sanitise leaves the weights alone: when it defeats black-box verification, the verdict says so apart,
    and the lowest tier that *breaks* the mark is read from the attacks that change the model."""
    board = _board()
    for c in board["cells"]:
        if c["defense_label"] == "mark" and c["model_attack_label"] == "prompt_sanitise" and c["metric"] == "tpr@1e-06":
            c.update(value=0.0, low=0.0, high=0.369)
    board["cells"] = [c for c in board["cells"] if not c["model_attack_label"].startswith("unlearn")]
    v = next(s for s in verdicts(board) if s.startswith("**mark**"))
    assert "defeated by `prompt_sanitise` (method_known: TPR 0.00" in v
    assert "still usable by `prompt_sanitise`" not in v and "lowest tier that breaks it and leaves a usable" not in v
    assert "No attack of the grid breaks it and leaves a usable model." in v
    assert "pools several images" in v and "N = 8" in v
