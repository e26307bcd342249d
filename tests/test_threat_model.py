"""Each defence's threat model: declared, listed, stored per cell, marked in the matrix and the report; `resample`."""

from __future__ import annotations

import json
import math

import pytest

from markbench import ThreatSetting, model_attacks
from markbench.registries import defenses
from markbench.cli import main
from markbench.config import load_config
from markbench.plan import build_plan
from markbench.plugins import QualityMeasure, threat_scope
from markbench.runner import Runner
from markbench.store import ResultStore

from .conftest import write_config

EXPECTED = {"none": "api", "dwtdct": "api", "dwtdctsvd": "api", "hidden": "api", "tree_ring": "api",
            "gaussian_shading": "api", "sleepermark": "weights", "aqualora": "weights", "wdm": "weights",
            "stable_signature": "weights"}

TOML = """
metrics = ["tpr", "auc", "psnr"]

[run]
output = "{output}"
seeds = [0]
num_images = 2
batch_size = 2
target_fprs = [0.1]
primary_metric = "auc"

[model]
builtin = "micro-sd"
height = 64
width = 64
num_inference_steps = 2

[prompts]
set = "micro:shapes"

[[defenses]]
name = "tree_ring"
radius = 2.0
channel = 0

[[model_attacks]]
name = "none"

[[model_attacks]]
name = "resample"
"""


def test_every_builtin_defence_declares_its_threat_setting_in_its_own_class():
    for name, setting in EXPECTED.items():
        cls = defenses.get(name)
        declared = next(k.__dict__["threat"] for k in cls.__mro__ if "threat" in k.__dict__)
        assert declared is ThreatSetting(setting), name
        assert any("threat" in k.__dict__ for k in cls.__mro__[:-3]), f"{name} relies on the base-class default"


def test_threat_scope_marks_model_attacks_on_api_defences_only():
    lora, none = model_attacks.get("lora"), model_attacks.get("none")
    assert threat_scope(defenses.get("tree_ring"), lora)["outside"] is True
    assert threat_scope(defenses.get("tree_ring"), none)["outside"] is False
    assert threat_scope(defenses.get("sleepermark"), lora)["outside"] is False


def test_ls_shows_each_defences_threat_setting(capsys):
    assert main(["ls", "defenses"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines()
            if line.count("│") >= 3 and line.split("│")[1].strip() in EXPECTED}
    assert rows == EXPECTED


def test_initial_noise_defences_do_not_claim_paired_quality():
    for name in ("tree_ring", "gaussian_shading"):
        assert QualityMeasure.PAIRED not in defenses.get(name).measures()
    assert QualityMeasure.PAIRED in defenses.get("dwtdctsvd").measures()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("threat")
    path = write_config(tmp, TOML)
    cfg = load_config(path)
    summary = Runner(cfg).run()
    return path, cfg, summary


def test_resample_gives_the_plain_generation_and_the_cell_is_marked_outside(run, capsys):
    path, cfg, summary = run
    assert summary.ok and summary.cells_ok == 2
    plan = build_plan(cfg)
    by = {c.model_attack.name: c for c in plan.cells}
    # under resample the "marked" images are the released model's standard samples: the clean twins themselves
    assert plan.stages[by["resample"].unattacked].plugin is None
    assert by["resample"].unattacked == by["resample"].clean_twins
    assert plan.stages[by["none"].unattacked].plugin is not None  # without it: the keyed generation
    # so the positives are the negatives: detection sits exactly at chance
    assert by["resample"].detect_pos == by["resample"].detect_neg
    store = ResultStore(cfg.output / "results.sqlite")
    cells = store.cells_frame()
    df = store.dataframe()
    store.close()
    threat = {r.model_attack: json.loads(r.threat_json) for r in cells.itertuples()}
    assert threat["resample"]["outside"] is True and threat["none"]["outside"] is False
    assert threat["none"]["defense"] == "api"
    auc = df[(df.metric == "auc") & (df.model_attack == "resample")]
    assert list(auc.value) == [0.5]
    psnr = df[(df.metric == "psnr_watermark")]
    assert len(psnr) == 2 and all(v is None or math.isnan(v) for v in psnr.value)
    assert all("not applicable" in n for n in psnr.note)
    assert main(["show", "--config", str(path), "--metric", "auc"]) == 0
    out = capsys.readouterr().out
    assert out.count("\u2020") == 2  # the resample cell and the legend line
    assert "outside the defence's threat model" in out


def test_report_marks_the_cell_outside_the_threat_model(run, tmp_path):
    from markbench.reports.html import render_report

    _, cfg, _ = run
    out = tmp_path / "r.html"
    render_report(cfg.output / "results.sqlite", out)
    html = out.read_text()
    assert "Threat model of each defence" in html
    assert "<b>tree_ring(channel=0,radius=2)</b>: protects a model served behind an API" in html
    assert 'class="c outside"' in html
