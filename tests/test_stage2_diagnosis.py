"""Issue 23's stage-2 diagnosis (experiments/stage2_oracle.py, stage2_diagnose.py, stage2_report.py): the oracle's
shift is the loss's per-timestep optimum, the tables show what was measured, the docs hold the committed numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from experiments import stage2_report as rep
from experiments.stage2_oracle import eps_shift

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT / "experiments" / "results" / "stage2_oracle.json"
RUNS = ROOT / "experiments" / "results" / "stage2_tuning.json"


@pytest.mark.parametrize("t, eta", [(1, 0.02), (51, 1.0), (400, 5.0)])
def test_oracle_shift_moves_the_clean_latent_estimate_by_the_optimal_share_of_the_residual(t, eta):
    g = torch.Generator().manual_seed(t)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ac = torch.cumprod(1 - betas, 0)
    dz = 0.05 * torch.randn(4, 16, 16, generator=g)
    z0, noise, eps = (torch.randn(4, 16, 16, generator=g) for _ in range(3))
    abar = ac[t]
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise

    def x0(e):
        return (z_t - (1 - abar).sqrt() * e) / abar.sqrt()

    w1 = eta / (1 + math.exp((t - 250.0) / 100.0))  # eta * sigmoid(-(t - tau) / beta)
    w2 = 1 / (1 + math.exp(-(t - 250.0) / 100.0))
    moved = x0(eps + eps_shift(t, eta, 250.0, 100.0, ac, dz)) - x0(eps)
    assert torch.allclose(moved, (w1 / (w1 + w2)) * dz, atol=1e-5)


def test_oracle_table_marks_the_ceiling_and_names_the_shifted_branch():
    result = {"entry": "8e7bc806a1bc83d9", "bits": 32, "n": 16, "guidance": 7.5, "rows": [
        {"eta": None, "branch": "twin + dz (ceiling)", "bit_accuracy": 0.816, "psnr_to_twin": 30.76,
         "ssim_to_twin": 0.866, "keyless_laplacian_auc": 0.52},
        {"eta": 0.02, "branch": "cond", "a_at_t1": 0.194, "bit_accuracy": 0.844, "latent_shift_along_dz": 0.62,
         "psnr_to_twin": 34.02, "ssim_to_twin": 0.911, "keyless_laplacian_auc": 0.555},
        {"eta": 1.0, "branch": "both", "a_at_t1": 0.923, "bit_accuracy": 0.818, "latent_shift_along_dz": 0.52,
         "psnr_to_twin": 35.57, "ssim_to_twin": 0.934, "keyless_laplacian_auc": 0.547}]}
    text = rep.render_oracle(result)
    assert "| - | twin + `dz` (ceiling) | - | 1 | 0.816 | 30.8 | 0.866 | 0.52 |" in text
    assert "| 0.02 | triggered (conditional) only | 0.19 | 0.62 | 0.844 | 34.0 | 0.911 | 0.56 |" in text
    assert "| 1 | both (prompt-independent) | 0.92 | 0.52 | 0.818 | 35.6 | 0.934 | 0.55 |" in text


def test_tuning_table_pairs_each_image_checkpoint_with_the_last_probe_before_it_and_shows_a_stopped_runs_last_probe():
    probe = {f"{b}@{t}": {"a": 0.01 * t / 51 + (0.5 if b == "trigger" else 0.0), "r": 0.2}
             for b in ("trigger", "plain", "empty") for t in (1, 11, 51, 101, 201, 301, 501)}
    early = {k: {"a": 0.0, "r": 0.0} for k in probe}
    run = {"name": "x", "eta": 0.02, "lr": 1e-3, "clip": 1e-5, "only_wm": False,
           "optimum_a": {"1": 0.194, "11": 0.19, "51": 0.128, "101": 0.1, "201": 0.05, "301": 0.02, "501": 0.001},
           "log": [{"step": 0, "probe": early}, {"step": 100, "probe": probe, "train_s_per_step": 1.2},
                   {"step": 200, "probe": probe, "train_s_per_step": 1.3}],
           "rows": [{"step": 0, "bit_accuracy_trigger": 0.51, "bit_accuracy_no_trigger": 0.5,
                     "psnr_to_twin": float("inf"), "ssim_to_twin": 1.0},
                    {"step": 150, "bit_accuracy_trigger": 0.6, "bit_accuracy_no_trigger": 0.52,
                     "psnr_to_twin": 33.33, "ssim_to_twin": 0.95, "keyless_laplacian_auc": 0.63}]}
    text = rep.render_runs([run])
    assert ("| x | up_attention | 0.02 | 0.001 | 1e-05 | the defence's three | 0 | 0.510 | 0.500 | identical | 1.000 | "
            "- | 0.000 / 0.000 / 0.000 | 0.000 / 0.000 | +0.000 | 0.00 | - |") in text  # no keyless AUC logged
    assert ("| x | up_attention | 0.02 | 0.001 | 1e-05 | the defence's three | 150 | 0.600 | 0.520 | 33.3 | 0.950 | "
            "0.63 | 0.500 / 0.510 / 0.539 | 0.010 / 0.010 | +0.500 | 0.20 | 1.20 |") in text
    assert ("| x | up_attention | 0.02 | 0.001 | 1e-05 | the defence's three | 200 | - | - | - | - | - | "
            "0.500 / 0.510 / 0.539 | 0.010 / 0.010 | +0.500 | 0.20 | 1.30 |") in text  # a stopped run
    assert text.count("| x |") == 3
    wider = rep.render_runs([{**run, "trainable": "up_blocks", "only_wm": True}])
    assert "| x | up_blocks | 0.02 | 0.001 | 1e-05 | watermark only (capacity test) | 150 |" in wider
    assert "eta 0.02: 0.194 / 0.128 / 0.050" in text


@pytest.mark.skipif(not (ORACLE.exists() and RUNS.exists()), reason="no committed diagnosis")
def test_the_diagnosis_tables_in_the_docs_are_the_renderings_of_the_committed_measurements():
    text = (ROOT / "docs" / "operating_point.md").read_text()
    for begin, end, block in ((rep.ORACLE_BEGIN, rep.ORACLE_END, rep.render_oracle(json.loads(ORACLE.read_text()))),
                              (rep.RUNS_BEGIN, rep.RUNS_END, rep.render_runs(json.loads(RUNS.read_text())))):
        assert text[text.index(begin) + len(begin):text.index(end)].strip() == block.strip()
