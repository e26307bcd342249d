"""Results of a model attack that assumes more than its threat model gives the attacker (its declared
``beyond_threat_model``: merge(other=base) needs the owner's clean base) are marked, with a legend line, where
results are printed: the CLI matrix, the leaderboard Markdown (and its JSON), the report's heatmap and utility charts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from markbench import registries
from markbench.registries import STRONGER_MARK, exceeds_threat_model

from .test_utility_curves import TPR, synthetic


def test_the_marker_follows_the_declared_attribute_not_the_name(monkeypatch):
    assert exceeds_threat_model("merge", {"other": "base", "alpha": 0.5})
    assert not exceeds_threat_model("merge", {"other": "finetuned", "alpha": 0.5})
    assert not exceeds_threat_model("lora", {"other": "base"})  # no declaration: never marked
    assert not exceeds_threat_model("no_such_attack", {})
    # any attack that declares beyond_threat_model is marked when its parameters match, whatever its name
    real = registries.model_attacks.info

    def info(name):
        got = real(name)
        if name == "lora":
            return SimpleNamespace(extra=(("beyond_threat_model", {"oracle": True}),), **{
                k: getattr(got, k) for k in ("name", "doc")})
        return got

    monkeypatch.setattr(registries.model_attacks, "info", info)
    assert exceeds_threat_model("lora", {"oracle": True, "rank": 4})
    assert not exceeds_threat_model("lora", {"oracle": False})


def _frame():
    rows = []
    for ma, params, v in (("none", {}, 1.0), ("merge", {"other": "base", "alpha": 0.5}, 0.4),
                          ("merge", {"other": "finetuned", "alpha": 0.5}, 0.8)):
        label = ma if ma == "none" else f"merge(other={params['other']})"
        rows.append(dict(metric="tpr", status="ok", model_attack=ma, model_attack_label=label,
                         model_attack_params=json.dumps(params), image_attack_label="none", seed=0,
                         defense_label="sleepermark", value=v, low=None, high=None, n=8, note="",
                         threat_json=json.dumps({})))
    return pd.DataFrame(rows)


def test_the_cli_matrix_marks_the_cell_and_prints_the_legend(capsys, tmp_path):
    from rich.console import Console

    from markbench.cli import _print_matrix, matrix

    sub, _, _ = matrix(_frame(), "tpr")
    assert dict(zip(sub["model_attack_label"], sub["stronger"])) == {
        "none": False, "merge(other=base)": True, "merge(other=finetuned)": False}
    cfg = SimpleNamespace(output=tmp_path, run=SimpleNamespace(primary_metric="tpr"))
    _print_matrix(cfg, "tpr", "table", Console(width=200), df=_frame())
    out = capsys.readouterr().out
    assert out.count(STRONGER_MARK) == 2  # the merge(other=base) cell and the legend line
    assert "assumes more than its threat model" in out
    _print_matrix(cfg, "tpr", "json", Console(width=200), df=_frame())
    cells = json.loads(capsys.readouterr().out)["cells"]["sleepermark"]
    assert {k: c["stronger_than_threat_model"] for k, c in cells.items()} == {
        "none | none": False, "merge(other=base) | none": True, "merge(other=finetuned) | none": False}


def test_the_leaderboard_marks_the_column_and_the_utility_curve_with_a_legend():
    from markbench.reports.leaderboard import build, to_markdown

    board = build(synthetic(), TPR)
    assert board["stronger_than_threat_model"] == ["merge(other=base) | none"]
    md = to_markdown(board)
    header = next(line for line in md.splitlines() if line.startswith("| defence | ") and "lora" in line)
    assert f"merge(other=base) \\| none {STRONGER_MARK}" in header
    assert f"merge(other=finetuned) \\| none {STRONGER_MARK}" not in header
    assert f"**merge (other=base) {STRONGER_MARK}**" in md and f"**merge (other=finetuned)**" in md
    assert md.count("assumes more than its threat model") == 1


def test_the_report_heatmap_marks_the_cell_and_states_the_legend():
    from markbench.reports.html import heatmap_html, threat_html

    res = synthetic()
    page = heatmap_html(res, TPR)
    marked = [c for c in res.cells if c.stronger_than_threat_model]
    assert {c.model_attack_label for c in marked} == {"merge(other=base)"}
    assert page.count('stronger"') == len({(res.row(c), res.column(c)) for c in marked})
    assert STRONGER_MARK in page
    assert "assumes more than its threat model" in threat_html(res)
