"""The README's results block is generated from the committed leaderboard (reports/readme.py), and kept fresh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from reports.readme import END, fpr_meaning, render_block, update

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


def test_check_reports_a_stale_block_and_the_command_rewrites_it(tmp_path):
    readme = tmp_path / "README.md"
    board = tmp_path / "lb.json"
    board.write_text(json.dumps(_board()))
    readme.write_text("intro\n<!-- results:begin -->\nold numbers 0.99\n<!-- results:end -->\noutro\n")
    cmd = [sys.executable, "-m", "bench.cli", "readme", "--readme", str(readme), "--leaderboard", str(board)]
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
    out = subprocess.run([sys.executable, "-m", "bench.cli", "readme", "--readme", str(readme), "--leaderboard",
                          str(board)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "results block" in out.stderr and "Traceback" not in out.stderr
