"""The README's results block is generated from the committed leaderboard (reports/readme.py), and kept fresh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from markbench.reports.readme import END, fpr_meaning, render_block, update

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_block_matches_the_committed_leaderboard():
    """Fails when README.md's numbers disagree with results/leaderboard.json: run `bench readme` to fix."""
    assert update(ROOT / "README.md", ROOT / "results" / "leaderboard.json", check=True)


def _board(metric="tpr@1e-06", seeds=(0,)):
    return {"kind": "markbench-leaderboard", "metric": metric, "n_images": 16, "negatives": "attacked",
            "generated": "2026-01-01T00:00:00Z", "source": {"config_path": "x.toml", "git_hash": "abc"},
            "grid": {"seeds": list(seeds), "image_attacks": ["none", "jpeg(quality=50)"], "model_attacks": ["none"]},
            "entries": [{"defense_label": "mark", "control": False,
                         "clean": {"value": 0.9375, "low": 0.79, "high": 0.99},
                         "robustness": {"mean": 0.5, "worst": 0.25, "worst_attack": "jpeg(quality=50)",
                                        "n_attacked": 1},
                         "quality": {"psnr_watermark": {"value": 31.24, "low": 30.0, "high": 32.5},
                                     "ssim_watermark": {"value": 0.912, "low": 0.9, "high": 0.92}}}]}


def test_block_states_values_intervals_and_conditions():
    block = render_block(_board(seeds=(0, 1, 2)))
    assert "| mark | 0.94 [0.79, 0.99] | 0.50 (1 cells) | 0.25 (jpeg(quality=50)) | 31.2 [30.0, 32.5] | " \
           "0.912 [0.900, 0.920] | - |" in block
    assert "N = 16 images per cell" in block and "3 seed(s)" in block and "spread between seeds" in block
    assert block.endswith(END)


def test_fpr_label_meaning_distinguishes_analytic_from_empirical():
    assert "analytic binomial threshold" in fpr_meaning("tpr@1e-06")
    empirical = fpr_meaning("tpr@fpr<=1/32")
    assert "empirical" in empirical and "1/32" in empirical and "analytic" not in empirical
    # the label is the FPR on the negatives the threshold was set on; on new images it is (j + 1)/(N + 1): 1/(N + 1)
    # with no negative above the threshold (below the label), about 1/N above the label with k of them above it
    assert "(j + 1)/(32 + 1)" in empirical and "1/(32 + 1) when none is" in empirical
    assert "about 1/32 more than the label when j = 1" in empirical


def test_fpr_label_meaning_does_not_call_a_threshold_with_one_negative_above_it_the_largest():
    # target 1e-2 on 128 negatives: floor(1.28) = 1 negative may score above the threshold (bench.stats), so the
    # threshold is the second-largest negative score; the text must say so, not "the largest score"
    from markbench.stats import empirical_fpr_label, empirical_threshold

    neg = list(range(128))
    label = empirical_fpr_label(128, 1e-2)
    threshold, _ = empirical_threshold(neg, 1e-2)
    assert label == "fpr<=1/128" and threshold == 126.0
    text = fpr_meaning(f"tpr@{label}")
    assert "N = 128 negatives: at most 1 of them score above it" in text and "at most 1/128" in text


def test_check_reports_a_stale_block_and_the_command_rewrites_it(tmp_path):
    readme = tmp_path / "README.md"
    board = tmp_path / "lb.json"
    board.write_text(json.dumps(_board()))
    readme.write_text("intro\n<!-- results:begin -->\nold numbers 0.99\n<!-- results:end -->\noutro\n")
    # --docs '': the command runs in the repository, and would otherwise rewrite its docs/*.md blocks, which hid a
    # stale docs block from the freshness test below (it ran after this one)
    cmd = [sys.executable, "-m", "markbench.cli", "readme", "--readme", str(readme), "--leaderboard", str(board),
           "--docs", ""]
    stale = subprocess.run(cmd + ["--check"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert stale.returncode == 1 and "STALE" in stale.stdout
    assert "old numbers" in readme.read_text()  # --check changes nothing
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| mark | 0.94 [0.79, 0.99]" in text
    again = subprocess.run(cmd + ["--check"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0


def test_a_readme_without_markers_is_one_sentence_exit_2(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    board = tmp_path / "lb.json"
    board.write_text(json.dumps(_board()))
    out = subprocess.run([sys.executable, "-m", "markbench.cli", "readme", "--readme", str(readme), "--leaderboard",
                          str(board), "--docs", ""], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "results block" in out.stderr and "Traceback" not in out.stderr


def test_docs_results_blocks_match_their_committed_results_files():
    """Fails when a docs/*.md results block disagrees with the results/*.json it names: run `bench readme`."""
    from markbench.reports.readme import doc_files, update_docs

    stale = [str(d) for d in doc_files(ROOT) if not update_docs(d, ROOT, check=True)]
    assert not stale, stale


def _cells_board():
    cells = []
    for d, m, i, metric, v in [("mark", "none", "none", "bit_accuracy", 0.98765),
                               ("mark", "none", "none", "tpr@fpr<=1/32", 0.5),
                               ("mark", "lora(steps=20)", "none", "bit_accuracy", 0.75),
                               ("other", "none", "none", "bit_accuracy", 0.5),
                               ("mark", "none", "none", "psnr_watermark", 31.25)]:
        cells.append({"defense_label": d, "model_attack_label": m, "image_attack_label": i, "seed": 0,
                      "metric": metric, "value": v, "low": v - 0.01, "high": v + 0.01, "n": 32})
    return {"kind": "markbench-leaderboard", "metric": "bit_accuracy", "negatives": "attacked",
            "generated": "2026-01-01T00:00:00Z", "source": {"config_path": "configs/x.toml", "git_hash": "abc"},
            "grid": {"seeds": [0], "defenses": ["mark", "other"], "model_attacks": ["none", "lora(steps=20)"],
                     "image_attacks": ["none"]},
            "entries": [{"defense_label": "mark", "clean": {"n_embeddings": 1}}], "cells": cells}


def test_docs_block_selects_cells_and_columns_and_states_conditions(tmp_path):
    from markbench.reports.readme import update_docs

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps(_cells_board()))
    doc = tmp_path / "m.md"
    doc.write_text("# M\n\n<!-- results:begin source=results/x.json defenses=mark metrics=bit_accuracy,"
                   "tpr@fpr<=1/32,psnr_watermark -->\nSTALE-CONTENT\n<!-- results:end -->\n\ntail\n")
    assert not update_docs(doc, tmp_path)  # rewritten
    text = doc.read_text()
    assert "| mark | none | none | 0.988 [0.978, 0.998] | 0.500 [0.490, 0.510] | 31.2 [31.2, 31.3] |" in text
    assert "| mark | lora(steps=20) | none | 0.750 [0.740, 0.760] | - | - |" in text
    assert "| other |" not in text and "STALE-CONTENT" not in text and text.endswith("\n\ntail\n")
    assert "N = 32 per number" in text and "1 independent embedding(s)" in text and "configs/x.toml" in text
    assert "empirical threshold" in text  # the FPR label's meaning, stated under the table
    assert update_docs(doc, tmp_path, check=True)  # idempotent: now fresh


def _render_bit_accuracy_block(tmp_path, board) -> str:
    """Write ``board`` as results/x.json under ``tmp_path`` and return a doc whose one block shows its defence
    ``mark``'s bit accuracy, rendered by ``bench readme``'s docs path."""
    from markbench.reports.readme import update_docs

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps(board))
    doc = tmp_path / "m.md"
    doc.write_text("<!-- results:begin source=results/x.json defenses=mark metrics=bit_accuracy -->\n"
                   "<!-- results:end -->\n")
    update_docs(doc, tmp_path)
    return doc.read_text()


def test_docs_block_of_a_several_seed_file_shows_every_seed_not_the_last_under_all_their_labels(tmp_path):
    """A results file with several seeds (embeddings) has one cell per seed at the same position: the block shows
    each seed's row with its own interval and says so (it showed the last seed's numbers alone, under a sentence
    claiming the spread between seeds)."""
    board = _cells_board()
    extra = [dict(c, seed=1, value=c["value"] - 0.2, low=c["low"] - 0.2, high=c["high"] - 0.2)
             for c in board["cells"] if c["defense_label"] == "mark"
             and c["model_attack_label"] == "none" and c["metric"] == "bit_accuracy"]
    board["cells"] = board["cells"] + extra
    board["grid"]["seeds"] = [0, 1]
    text = _render_bit_accuracy_block(tmp_path, board)
    assert "| mark | none | none | 0 | 0.988 [0.978, 0.998] |" in text
    assert "| mark | none | none | 1 | 0.788 [0.778, 0.798] |" in text
    assert "one row per seed" in text and "spread between seeds" not in text


def test_docs_block_header_names_the_seeds_of_the_results_file(tmp_path):
    """A results file made with ``--set run.seeds=[2]`` names its config, whose own seeds differ: the header says
    which seeds (deployments) the numbers are, not only how many."""
    board = _cells_board()
    board["grid"]["seeds"] = [2]
    board["cells"] = [dict(c, seed=2) for c in board["cells"]]
    text = _render_bit_accuracy_block(tmp_path, board)
    assert "1 seed(s) (2)," in text and "1 seed(s) (0)" not in text


def test_docs_block_with_a_missing_file_or_bad_option_is_one_sentence(tmp_path):
    from markbench.reports.readme import update_docs

    doc = tmp_path / "m.md"
    doc.write_text("<!-- results:begin source=results/nope.json -->\n<!-- results:end -->\n")
    with pytest.raises(ValueError, match="nope.json, which does not exist"):
        update_docs(doc, tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps(_cells_board()))
    doc.write_text("<!-- results:begin source=results/x.json colour=red -->\n<!-- results:end -->\n")
    with pytest.raises(ValueError, match="unknown option 'colour=red'"):
        update_docs(doc, tmp_path)


def test_generated_header_keeps_the_dirty_mark_of_a_results_file_made_from_uncommitted_changes():
    from markbench.reports.readme import short_hash

    assert short_hash("8717fc72ccfbe48a3674b55d4d7576852467e3b2+dirty") == "8717fc72ccfb+dirty"
    assert short_hash("8717fc72ccfbe48a3674b55d4d7576852467e3b2") == "8717fc72ccfb"
    assert short_hash(None) == "?"
