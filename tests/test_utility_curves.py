"""Detection against attacker utility (issue 24): the leaderboard's curves, their Markdown and the report's chart,
checked on a small synthetic results table against the values put into it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from markbench import stats
from markbench.reports.data import CellRow, Results, Value
from markbench.reports.html import utility_html
from markbench.reports.leaderboard import to_markdown, utility_curves

TPR = "tpr@1e-06"


def cell(defense: str, attack: str, label: str, params: dict, seed: int = 0, image_attack: str = "none",
         **metrics: Value) -> CellRow:
    row = CellRow(cell_id=f"{defense}/{label}/{image_attack}/{seed}", run_id="r", label=label, seed=seed,
                  defense=defense, defense_label=defense, defense_params={}, defense_version="1",
                  defense_origin="markbench", model_attack=attack, model_attack_label=label,
                  model_attack_params=params, model_attack_version="1", image_attack=image_attack,
                  image_attack_label=image_attack, image_attack_params={}, image_attack_version="1",
                  negatives="attacked", n_images=32, status="ok", error="", traceback="", timings={}, costs={},
                  stage_keys=[], updated=0.0)
    row.metrics.update({k.replace("_AT_", "@"): v for k, v in metrics.items()})
    return row


# (defence, steps) -> (utility, tpr, tpr interval)
TABLE = {("alpha", 20): (0.10, 0.95, (0.85, 0.99)), ("alpha", 200): (0.40, 0.80, (0.65, 0.90)),
         ("alpha", 2000): (0.70, 0.30, (0.15, 0.45)), ("beta", 20): (0.12, 1.00, (0.89, 1.00)),
         ("beta", 200): (0.45, 0.99, (0.85, 1.00)), ("beta", 2000): (0.75, 0.97, (0.84, 1.00))}


def synthetic() -> Results:
    cells = []
    for d in ("alpha", "beta"):
        cells.append(cell(d, "none", "none", {}, **{"tpr_AT_1e-06": Value(1.0, 0.9, 1.0, 32)}))
        for steps in (2000, 20, 200):  # stored out of order: the curve sorts by utility
            u, t, (lo, hi) = TABLE[(d, steps)]
            label = f"lora(steps={steps})"
            cells.append(cell(d, "lora", label, {"dataset": "tiny:style", "steps": steps, "lr": 1e-3},
                              utility_downstream=Value(u, u - 0.1, u + 0.1, 32),
                              **{"tpr_AT_1e-06": Value(t, lo, hi, 32)}))
            # an image-attacked cell of the same model attack is not a point of the curve
            cells.append(cell(d, "lora", label, {"dataset": "tiny:style", "steps": steps, "lr": 1e-3},
                              image_attack="jpeg", utility_downstream=Value(u, None, None, 32),
                              **{"tpr_AT_1e-06": Value(0.0, 0.0, 0.1, 32)}))
        # merge with the base and with a fine-tune: two lines (non-numeric parameter), not one
        for other, u, t in (("base", -0.02, 0.5), ("finetuned", -0.05, 0.7)):
            cells.append(cell(d, "merge", f"merge(other={other})", {"other": other, "alpha": 0.5},
                              utility_clip_delta=Value(u, u - 0.01, u + 0.01, 32),
                              **{"tpr_AT_1e-06": Value(t, t - 0.1, t + 0.1, 32)}))
    return Results(path=Path("synthetic.sqlite"), runs=[], cells=cells,
                   metric_order=[TPR, "utility_downstream", "utility_clip_delta"], notes={})


def test_utility_curves_points_are_the_stored_values_sorted_by_utility():
    curves = utility_curves(synthetic())
    lora = [c for c in curves if c["attack"] == "lora"]
    assert len(lora) == 1 and lora[0]["x_metric"] == "utility_downstream" and lora[0]["metric"] == TPR
    for d in ("alpha", "beta"):
        pts = lora[0]["lines"][d]
        assert [p["model_attack"] for p in pts] == ["lora(steps=20)", "lora(steps=200)", "lora(steps=2000)"]
        for p, steps in zip(pts, (20, 200, 2000)):
            u, t, (lo, hi) = TABLE[(d, steps)]
            assert p["x"]["value"] == pytest.approx(u) and p["x"]["low"] == pytest.approx(u - 0.1)
            assert (p["y"]["value"], p["y"]["low"], p["y"]["high"]) == pytest.approx((t, lo, hi))
    merges = sorted((c["params"], c["x_metric"]) for c in curves if c["attack"] == "merge")
    assert merges == [("other=base", "utility_clip_delta"), ("other=finetuned", "utility_clip_delta")]


def test_utility_curves_combine_seeds_with_the_hierarchical_bootstrap():
    a = [0.9, 1.0, 1.0, 0.8]
    b = [0.2, 0.3, 0.1, 0.2]
    cells = [cell("alpha", "lora", "lora(steps=200)", {"steps": 200}, seed=s,
                  utility_downstream=Value(0.5, 0.3, 0.7, 4, samples=(1, 0, 1, 0)),
                  **{"tpr_AT_1e-06": Value(sum(v) / 4, None, None, 4, samples=tuple(v))})
             for s, v in ((0, a), (1, b))]
    res = Results(path=Path("x"), runs=[], cells=cells, metric_order=[TPR, "utility_downstream"], notes={})
    (pt,) = utility_curves(res)[0]["lines"]["alpha"]
    ref = stats.hierarchical_bootstrap([a, b])
    assert (pt["y"]["value"], pt["y"]["low"], pt["y"]["high"]) == pytest.approx((ref.value, ref.low, ref.high))
    # the utility too, from its stored per-image outcomes (attacker_utility stores them)
    ref_x = stats.hierarchical_bootstrap([[1, 0, 1, 0], [1, 0, 1, 0]])
    assert (pt["x"]["value"], pt["x"]["low"], pt["x"]["high"]) == pytest.approx((ref_x.value, ref_x.low, ref_x.high))
    assert pt["x"]["low"] < 0.5 < pt["x"]["high"]
    assert pt["y"]["n_attack_runs"] == 2


def test_utility_chart_plots_the_curve_values():
    res = synthetic()
    page = utility_html(utility_curves(res), res.defense_labels())
    charts = re.findall(r'<svg[^>]*class="utility-chart"[^>]*data-attack="(\w+)"', page)
    assert sorted(charts) == ["lora", "merge", "merge"]
    pts = re.findall(r'<circle class="upt"[^>]*data-defense="(\w+)" data-model-attack="([^"]+)" data-x="([^"]+)" '
                     r'data-y="([^"]+)" data-y-low="([^"]+)" data-y-high="([^"]+)"', page)
    lora = {(d, int(re.search(r"\d+", ma).group())): tuple(map(float, rest)) for d, ma, *rest in pts
            if ma.startswith("lora")}
    assert set(lora) == set(TABLE)
    for key, (u, t, (lo, hi)) in TABLE.items():
        assert lora[key] == pytest.approx((u, t, lo, hi))
    # each defence's line passes through its points in order of utility
    m = re.search(r'<polyline[^>]*data-defense="alpha" points="([^"]+)"', page)
    xs = [float(p.split(",")[0]) for p in m.group(1).split()]
    assert xs == sorted(xs) and len(xs) == 3


def test_leaderboard_markdown_has_the_utility_section():
    from markbench.reports.leaderboard import build

    res = synthetic()
    board = build(res, TPR)
    md = to_markdown(board)
    assert "#### Detection against attacker utility" in md
    line = next(s for s in md.splitlines() if s.startswith("| alpha | lora"))
    # utility with its stored interval (u -+ 0.1 in synthetic()), then detection with its own
    assert "lora(steps=20): 0.100 [0.000, 0.200] &rarr; 0.950 [0.850, 0.990]" in line
    assert line.index("steps=20)") < line.index("steps=200)") < line.index("steps=2000)")


def test_leaderboard_without_model_attack_utility_has_no_section():
    from markbench.reports.leaderboard import build

    res = synthetic()
    res.cells = [c for c in res.cells if c.model_attack == "none"]
    board = build(res, TPR)
    assert "utility_curves" not in board and "attacker utility" not in to_markdown(board)


def test_docs_utility_block_shows_each_sweep_point_with_its_stored_utility_and_detection():
    """`view=utility` in a docs results block (bench readme): a row per sweep point and defence, with the values and
    intervals put into the results, the unattacked cell as the reference row, the selection applied."""
    from markbench.reports.leaderboard import build
    from markbench.reports.readme import render_table

    board = build(synthetic(), TPR)
    board["grid"]["model_attacks"] = ["none", "lora(steps=20)", "lora(steps=200)", "lora(steps=2000)"]
    block = render_table(board, "results/x.json", {"view": ["utility"], "defenses": ["beta", "alpha"],
                                                   "model_attacks": ["lora(steps=20)", "lora(steps=2000)"]})
    rows = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| none | beta | - | 1.000 [0.900, 1.000] |",
        "| none | alpha | - | 1.000 [0.900, 1.000] |",
        "| lora(steps=20) | beta | `utility_downstream` 0.120 [0.020, 0.220] | 1.000 [0.890, 1.000] |",
        "| lora(steps=20) | alpha | `utility_downstream` 0.100 [0.000, 0.200] | 0.950 [0.850, 0.990] |",
        "| lora(steps=2000) | beta | `utility_downstream` 0.750 [0.650, 0.850] | 0.970 [0.840, 1.000] |",
        "| lora(steps=2000) | alpha | `utility_downstream` 0.700 [0.600, 0.800] | 0.300 [0.150, 0.450] |"]
    assert block.startswith("<!-- results:begin source=results/x.json defenses=beta,alpha "
                            "model_attacks=lora(steps=20),lora(steps=2000) view=utility -->")
    assert "N = 32 per number" in block and "1 attack run(s) per point" in block and "analytic binomial" in block


def test_docs_block_refuses_an_unknown_view_in_one_sentence(tmp_path):
    from markbench.reports.readme import update_docs

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text("{}")
    doc = tmp_path / "m.md"
    doc.write_text("<!-- results:begin source=results/x.json view=curves -->\n<!-- results:end -->\n")
    with pytest.raises(ValueError, match=r"m\.md: view=curves in a results block: allowed cells, utility"):
        update_docs(doc, tmp_path)


def _with_loss() -> Results:
    """synthetic() with the held-out loss stored on alpha's LoRA points (loss = 0.03 - 0.01 * utility)."""
    res = synthetic()
    for c in res.cells:
        if c.defense == "alpha" and c.model_attack == "lora":
            u = c.metrics["utility_downstream"].value
            c.metrics["utility_heldout_loss"] = Value(0.03 - 0.01 * u, 0.029 - 0.01 * u, 0.031 - 0.01 * u, 32,
                                                      higher_is_better=False)
    res.metric_order.append("utility_heldout_loss")
    return res


def test_the_heldout_loss_is_shown_beside_recognition_wherever_utility_is_shown():
    from markbench.reports.leaderboard import build
    from markbench.reports.readme import render_table

    res = _with_loss()
    lora = next(c for c in utility_curves(res) if c["attack"] == "lora")
    assert lora["loss_metric"] == "utility_heldout_loss" and lora["x_metric"] == "utility_downstream"
    alpha20 = lora["lines"]["alpha"][0]
    assert (alpha20["loss"]["value"], alpha20["loss"]["low"]) == pytest.approx((0.029, 0.028))
    assert all("loss" not in p for p in lora["lines"]["beta"])  # beta stored none: nothing invented
    board = build(res, TPR)
    md = to_markdown(board)
    assert "lora(steps=20): 0.100 [0.000, 0.200] (held-out loss 0.0290 [0.0280, 0.0300]) &rarr; 0.950" in md
    assert "lower = more utility" in md
    page = utility_html(board["utility_curves"], res.defense_labels())
    losses = sorted(float(v) for v in re.findall(r'data-loss="([^"]+)"', page))
    assert losses == pytest.approx([0.023, 0.026, 0.029])  # alpha's three points, beta's none
    assert "<td>0.0230 [0.0220, 0.0240]</td>" in page  # steps=2000: u = 0.7
    block = render_table(board, "results/x.json", {"view": ["utility"], "defenses": ["alpha"],
                                                   "model_attacks": ["lora(steps=200)"]})
    assert ("| lora(steps=200) | alpha | `utility_downstream` 0.400 [0.300, 0.500]; `utility_heldout_loss` "
            "0.0260 [0.0250, 0.0270] | 0.800 [0.650, 0.900] |") in block
