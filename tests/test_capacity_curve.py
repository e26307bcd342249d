"""Issue 23's capacity curve (experiments/capacity_curve.py): the fidelity bar, the message-length rule, the docs
table being the rendering of the committed measurement, and the config built on the chosen point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import capacity_curve as cc
from markbench.config import load_config
from markbench.stats import bit_threshold

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "data" / "capacity_curve.json"


def _row(bits, rms, acc, t4, t6, psnr=35.0, ssim=0.93, auc=0.55):
    return {"bits": bits, "residual_rms": rms, "bit_accuracy": acc, "tpr_0.0001": t4, "tpr_1e-06": t6,
            "tau_0.0001": bit_threshold(bits, 1e-4), "tau_1e-06": bit_threshold(bits, 1e-6), "psnr": psnr,
            "ssim": ssim, "keyless_auc": auc, "seconds": 1.0, "n_images": 128}


def test_bar_needs_psnr_ssim_and_keyless_auc_together():
    assert cc.at_bar(_row(16, 0.05, 0.9, 0.3, 0.0))
    assert not cc.at_bar(_row(16, 0.05, 0.9, 0.3, 0.0, psnr=29.9))
    assert not cc.at_bar(_row(16, 0.05, 0.9, 0.3, 0.0, ssim=0.89))
    assert not cc.at_bar(_row(16, 0.05, 0.9, 0.3, 0.0, auc=0.71))


def test_eight_bits_cannot_resolve_1e4_and_are_never_chosen():
    assert bit_threshold(8, 1e-4) == 9 and not cc.resolves(_row(8, 0.05, 0.99, 0.0, 0.0))
    got = cc.choose([_row(8, 0.05, 0.99, 0.0, 0.0), _row(16, 0.05, 0.80, 0.1, 0.0)])
    assert got["bits"] == 16


def test_rule_prefers_the_full_bar_then_tpr_at_1e4_then_detection_power():
    full = [_row(16, 0.05, 0.97, 0.95, 0.0), _row(32, 0.05, 0.96, 0.97, 0.92), _row(48, 0.05, 0.90, 0.6, 0.4)]
    assert cc.choose(full)["bits"] == 32
    part = [_row(16, 0.05, 0.97, 0.95, 0.0), _row(32, 0.05, 0.93, 0.91, 0.7), _row(48, 0.05, 0.9, 0.6, 0.4)]
    assert cc.choose(part)["bits"] == 32
    power = [_row(16, 0.05, 0.91, 0.36, 0.0), _row(32, 0.05, 0.86, 0.5, 0.2), _row(48, 0.05, 0.8, 0.5, 0.3)]
    assert cc.choose(power)["bits"] == 48  # tie at 1e-4: the longer
    visible = [_row(48, 0.1, 0.99, 1.0, 1.0, ssim=0.84), _row(16, 0.05, 0.9, 0.2, 0.0)]
    assert (cc.choose(visible)["bits"], cc.choose(visible)["residual_rms"]) == (16, 0.05)
    assert cc.choose([_row(32, 0.1, 0.99, 1.0, 1.0, ssim=0.8)])["bits"] is None


@pytest.mark.skipif(not DATA.exists(), reason="no committed capacity measurement")
def test_the_docs_table_is_the_rendering_of_the_committed_measurement():
    result = json.loads(DATA.read_text())
    text = (ROOT / "docs" / "operating_point.md").read_text()
    block = text[text.index(cc.BEGIN) + len(cc.BEGIN):text.index(cc.END)].strip()
    assert block == cc.render(result).strip()
    for r in result["rows"]:  # the thresholds stored are the analytic ones
        assert r["tau_0.0001"] == bit_threshold(r["bits"], 1e-4) and r["tau_1e-06"] == bit_threshold(r["bits"], 1e-6)


@pytest.mark.skipif(not DATA.exists(), reason="no committed capacity measurement")
def test_the_config_embeds_at_the_point_the_curve_chose_with_the_curves_stage1_schedule():
    result = json.loads(DATA.read_text())
    choice = cc.choose(result["rows"])
    cfg = load_config(ROOT / "configs" / "operating-point-paper-stage2.toml", check_output=False)
    (sm,) = [s for s in cfg.defenses if s.name == "sleepermark"]
    p = sm.param_dict
    assert (p["bits"], p["residual_rms"]) == (choice["bits"], choice["residual_rms"])
    s = result["schedule"]
    assert (p["stage1_latent_steps"], p["stage1_steps"], p["image_loss_start"]) == \
        (s["stage1_latent_steps"], s["stage1_steps"], s["image_loss_start"])
    assert p["trigger_position"] == "suffix" and cfg.run.seeds == [0, 1, 2]
    assert (p["tau"], p["beta"], p["uncond_prob"]) == (250.0, 100.0, 0.0)  # the paper's


def test_stage2_probe_table_lists_every_checkpoint_and_marks_the_untouched_model():
    from experiments import stage2_steps as s2

    rows = [{"step": 0, "bit_accuracy_trigger": 0.5, "bit_accuracy_no_trigger": 0.51, "psnr_to_twin": float("inf"),
             "ssim_to_twin": 1.0, "seconds": 30},
            {"step": 150, "bit_accuracy_trigger": 0.61, "bit_accuracy_no_trigger": 0.52, "psnr_to_twin": 36.4,
             "ssim_to_twin": 0.98, "seconds": 200}]
    text = s2.render({"entry": "8e7bc806a1bc83d9", "bits": 32, "eta": 1.0, "lr": 1e-3, "steps": 600, "batch": 8,
                      "n": 16, "ceiling_twin_plus_delta": 0.83, "rows": rows})
    assert "| 0 | 0.500 | 0.510 | identical | 1.000 | 30 |" in text
    assert "| 150 | 0.610 | 0.520 | 36.4 | 0.980 | 200 |" in text
    assert "bit accuracy 0.830" in text and "`8e7bc806a1bc`" in text


@pytest.mark.skipif(not (ROOT / "docs" / "data" / "stage2_steps.json").exists(), reason="no committed probe")
def test_the_stage2_probe_table_in_the_docs_is_the_rendering_of_the_committed_measurement():
    from experiments import stage2_steps as s2

    result = json.loads((ROOT / "docs" / "data" / "stage2_steps.json").read_text())
    text = (ROOT / "docs" / "operating_point.md").read_text()
    assert text[text.index(s2.BEGIN) + len(s2.BEGIN):text.index(s2.END)].strip() == s2.render(result).strip()
