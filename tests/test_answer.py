"""The report's first section (issue 25): verdicts, the table, reported rows and disagreements, checked on a small
synthetic results table against the values put into it."""

from __future__ import annotations

import html
from pathlib import Path

from markbench.reports.answer import SURVIVES, answer_html, build, load_reported
from markbench.reports.data import Results, Value
from markbench.reports.html import ci_html

from .test_utility_curves import cell

TPR = "tpr@1e-06"

REPORTED = """
[[reported]]
defense = "mark"
model_attack = "lora"
match = { steps = 200 }
metric = "tpr@1e-06"
value = 0.99
setting = "SD v1.4"
source = "Paper A, Table 2"

[[reported]]
defense = "mark"
model_attack = "none"
metric = "tpr@1e-06"
value = 0.95
setting = "SD v1.4"
source = "Paper A, Table 1"

[[reported]]
defense = "other"
model_attack = "none"
metric = "tpr@1e-06"
value = 1.0
source = "Paper B"
"""


def results() -> Results:
    cells = [
        cell("mark", "none", "none", {}, **{"tpr_AT_1e-06": Value(0.97, 0.9, 1.0, 32)},
             psnr_watermark=Value(31.5, 30.9, 32.1, 32), keyless_auc=Value(0.55, 0.41, 0.69, 64)),
        cell("mark", "lora", "lora(steps=20)", {"steps": 20}, **{"tpr_AT_1e-06": Value(0.9, 0.8, 0.96, 32)},
             utility_downstream=Value(0.1, 0.03, 0.25, 32)),
        cell("mark", "lora", "lora(steps=200)", {"steps": 200}, **{"tpr_AT_1e-06": Value(0.2, 0.1, 0.35, 32)},
             utility_downstream=Value(0.7, 0.5, 0.84, 32)),
        cell("mark", "lora", "lora(steps=200)", {"steps": 200}, image_attack="jpeg",
             **{"tpr_AT_1e-06": Value(0.0, 0.0, 0.1, 32)}),
        # a zero-bit defence: no analytic TPR, its empirical operating point instead
        cell("zero", "none", "none", {}, **{"tpr_AT_fpr<=1/32": Value(0.6, 0.42, 0.76, 32)}),
        cell("zero", "lora", "lora(steps=20)", {"steps": 20}, **{"tpr_AT_fpr<=1/32": Value(0.1, 0.02, 0.25, 32)}),
        cell("none", "none", "none", {}, **{"tpr_AT_1e-06": Value(0.0, 0.0, 0.1, 32)}),
    ]
    variant = cell("mark", "none", "none", {}, **{"tpr_AT_1e-06": Value(0.0, 0.0, 0.1, 32)})
    variant.defense_label = "mark[no_trigger]"  # a second way of generating: no reported rows, no disagreement
    cells.append(variant)
    return Results(path=Path("synthetic.sqlite"), runs=[], cells=cells,
                   metric_order=[TPR, "tpr@fpr<=1/32", "utility_downstream", "psnr_watermark", "keyless_auc"],
                   notes={})


def test_the_table_holds_each_defences_detection_and_utility_per_model_attack():
    doc = build(results(), load_reported(REPORTED))
    assert doc["columns"] == ["none", "lora(steps=20)", "lora(steps=200)"]
    mark = next(r for r in doc["rows"] if r["defense"] == "mark")
    assert mark["cells"]["lora(steps=200)"]["metric"] == TPR
    d = mark["cells"]["lora(steps=200)"]["detection"]
    assert (d["value"], d["low"], d["high"]) == (0.2, 0.1, 0.35)  # the unattacked-by-image cell, not the jpeg one
    assert mark["cells"]["lora(steps=200)"]["utility"]["value"] == 0.7
    assert "utility" not in mark["cells"]["none"]
    assert mark["fidelity"]["psnr_watermark"]["value"] == 31.5 and mark["fidelity"]["keyless_auc"]["value"] == 0.55
    zero = next(r for r in doc["rows"] if r["defense"] == "zero")
    assert zero["cells"]["none"]["metric"] == "tpr@fpr<=1/32"  # named for what it is
    assert next(r for r in doc["rows"] if r["defense"] == "none")["control"]


def test_verdicts_split_survived_from_broken_at_the_stated_rate_with_utility():
    doc = build(results(), load_reported(REPORTED))
    (mark,) = [v for v in doc["verdicts"] if v.startswith("mark:")]
    assert SURVIVES == 0.5
    assert "still detected after lora(steps=20) (tpr@1e-06 0.900, utility 0.100)" in mark
    assert "broken by lora(steps=200) (tpr@1e-06 0.200, utility 0.700)" in mark
    assert "psnr_watermark 31.5" in mark
    assert not any(v.startswith("none:") for v in doc["verdicts"])  # the control gets no verdict


def test_a_reported_number_outside_the_interval_is_called_out_and_one_inside_is_not():
    doc = build(results(), load_reported(REPORTED))
    assert [(r["defense"], r["column"], r["reported"].value) for r in doc["reported"]] == [
        ("mark", "lora(steps=200)", 0.99), ("mark", "none", 0.95)]  # 'other' is not in this run
    assert doc["disagreements"] == ["mark under lora(steps=200): tpr@1e-06 0.200 [0.100, 0.350] here, "
                                    "0.99 reported (SD v1.4; Paper A, Table 2)"]  # 0.95 lies inside [0.9, 1.0]: no call-out


def test_the_section_renders_the_rows_reported_rows_and_disagreement():
    page = answer_html(results(), lambda x: html.escape(str(x)), ci_html, load_reported(REPORTED))
    assert page.count('<tr class="reported">') == 2 and "Paper A, Table 2" in page
    assert "Where this run and the papers disagree" in page
    assert 'data-metric="tpr@fpr&lt;=1/32"' in page


def test_the_shipped_reported_numbers_parse_and_name_known_metrics():
    shipped = load_reported()
    assert len(shipped) >= 10 and all(r.source and r.setting for r in shipped)
    assert {r.metric for r in shipped} <= {"bit_accuracy", "tpr@1e-06"}
    sleeper = {(r.model_attack, r.match.get("steps"), r.metric): r.value for r in shipped if r.defense == "sleepermark"}
    assert sleeper[("lora", 2000, "tpr@1e-06")] == 0.992  # ../shared/METHODS.md's table


def test_the_heldout_loss_stands_beside_the_utility_in_the_answer():
    res = results()
    for c in res.cells:
        if c.model_attack_label == "lora(steps=200)" and c.image_attack == "none":
            c.metrics["utility_heldout_loss"] = Value(0.0142, 0.0120, 0.0164, 32, higher_is_better=False)
    doc = build(res, load_reported(REPORTED))
    mark = next(r for r in doc["rows"] if r["defense"] == "mark")
    assert mark["cells"]["lora(steps=200)"]["utility_loss"]["value"] == 0.0142
    assert "utility_loss" not in mark["cells"]["lora(steps=20)"]  # not stored there: not shown
    (verdict,) = [v for v in doc["verdicts"] if v.startswith("mark:")]
    assert "broken by lora(steps=200) (tpr@1e-06 0.200, utility 0.700, held-out loss 0.0142)" in verdict
    page = answer_html(res, lambda x: html.escape(str(x)), ci_html, load_reported(REPORTED))
    assert "held-out loss (lower = more utility) 0.0142 [0.0120, 0.0164]" in page
