"""Attack seeds (issue 24): ``[run] attack_seeds`` repeats every training model attack within a run seed, and the
leaderboard's interval takes the spread between the attack runs in (the hierarchical bootstrap over repetitions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from markbench import stats
from markbench.config import load_config
from markbench.errors import ConfigError
from markbench.plan import build_plan, stage_seed
from markbench.reports.data import CellRow, Results, Value
from markbench.reports.leaderboard import _fmt_summary, build

from .conftest import MICRO_TOML, MODEL_ATTACKS_TOML, write_config

ATTACKS = MODEL_ATTACKS_TOML


def _plan(tmp_path, overrides=None, name="bench.toml"):
    return build_plan(load_config(write_config(tmp_path, MICRO_TOML + ATTACKS, name=name), overrides or {}))


def test_attack_seeds_repeat_only_training_attacks_and_keep_seed_zeros_keys(tmp_path):
    one = _plan(tmp_path)
    two = _plan(tmp_path, {"run.attack_seeds": [0, 1]}, name="two.toml")
    labels = lambda plan: sorted({c.model_attack.label for c in plan.cells})  # noqa: E731
    assert labels(one) == ["lora(steps=1)", "none", "prune"]
    assert labels(two) == ["lora(steps=1)", "lora(steps=1) a1", "none", "prune"]
    assert len(two.cells) == len(one.cells) * 4 // 3  # 2 defences x 3 image attacks more: lora's second run
    # attack seed 0 is the attack run the grid had before: every one of its stages and cells keeps its key
    assert set(one.stages) <= set(two.stages) and {c.key for c in one.cells} <= {c.key for c in two.cells}
    ma = {s.label: s for s in two.stages.values() if s.kind == "model_attack"}
    assert sorted(ma) == ["model attack lora(steps=1)", "model attack lora(steps=1) a1", "model attack prune"]
    a0, a1 = ma["model attack lora(steps=1)"], ma["model attack lora(steps=1) a1"]
    assert a1.inputs == a0.inputs and a1.extra_dict["attack_seed"] == 1 and "attack_seed" not in a0.extra_dict
    assert stage_seed(0, a0.key) != stage_seed(0, a1.key)  # another random stream: another training run


@pytest.mark.parametrize("value", [[], [0, 0], [-1], [1.5], ["a"]])
def test_bad_attack_seeds_are_a_config_error(tmp_path, value):
    with pytest.raises(ConfigError, match="run.attack_seeds"):
        _plan(tmp_path, {"run.attack_seeds": value}, name="bad.toml")


def _cell(attack_seed: int, samples: list[float], seed: int = 0, utility: list[float] | None = None) -> CellRow:
    label = "lora(steps=200)" + (f" a{attack_seed}" if attack_seed else "")
    row = CellRow(cell_id=f"c{seed}{attack_seed}", run_id="r", label=label, seed=seed, defense="alpha",
                  defense_label="alpha", defense_params={}, defense_version="1", defense_origin="markbench",
                  model_attack="lora", model_attack_label=label, model_attack_params={"steps": 200},
                  model_attack_version="1", image_attack="none", image_attack_label="none", image_attack_params={},
                  image_attack_version="1", negatives="attacked", n_images=len(samples), status="ok", error="",
                  traceback="", timings={}, costs={}, stage_keys=[], updated=0.0)
    est = stats.bootstrap(samples)  # the cell's stored interval, as the bit-accuracy metric stores it
    v = Value(float(np.mean(samples)), est.low, est.high, len(samples), "", True, tuple(samples))
    row.metrics["bit_accuracy"] = v
    if utility is not None:
        row.metrics["utility_downstream"] = Value(float(np.mean(utility)), None, None, len(utility), "", True,
                                                  tuple(utility))
    return row


def _results(cells: list[CellRow]) -> Results:
    metrics = ["bit_accuracy"] + (["utility_downstream"] if "utility_downstream" in cells[0].metrics else [])
    return Results(path=Path("x"), runs=[], cells=cells, metric_order=metrics, notes={})


def test_interval_widens_with_the_spread_between_attack_seeds():
    rng = np.random.default_rng(0)
    a = list(np.clip(rng.normal(0.60, 0.02, 32), 0, 1))
    b = list(np.clip(rng.normal(0.95, 0.02, 32), 0, 1))
    res = _results([_cell(0, a), _cell(1, b)])
    assert res.rows() == ["alpha a0", "alpha a1"] and res.columns() == ["none"]
    s = build(res, "bit_accuracy")["entries"][0]["per_attack_summary"]["none"]
    assert s["n_attack_runs"] == 2 and s["n_embeddings"] == 1
    # the same function over the two attack runs' images ...
    ref = stats.hierarchical_bootstrap([a, b])
    assert (s["value"], s["low"], s["high"]) == pytest.approx((ref.value, ref.low, ref.high))
    # ... and, independently: with two runs a quarter of the replicates draw run a twice (b twice), so the 95%
    # interval reaches the two runs' own means, far wider than a bootstrap of the pooled images
    assert s["low"] < np.mean(a) + 0.01 and s["high"] > np.mean(b) - 0.01
    pooled = stats.bootstrap(a + b)
    assert s["high"] - s["low"] > 3 * (pooled.high - pooled.low)
    # without a spread between the attack runs the interval is as narrow as the images make it
    same = build(_results([_cell(0, a), _cell(1, list(np.array(a) + 1e-9))]), "bit_accuracy")
    t = same["entries"][0]["per_attack_summary"]["none"]
    assert t["high"] - t["low"] < 0.25 * (s["high"] - s["low"])
    assert _fmt_summary(s).endswith("(1 embedding, 2 attack runs)")


def test_a_second_attack_seed_with_another_outcome_widens_the_interval_over_one_seed():
    """The same grid with one attack seed, then with a second whose attack run went otherwise: the leaderboard's
    interval of that column is several times wider, and now reaches both runs' means."""
    rng = np.random.default_rng(3)
    a = list(np.clip(rng.normal(0.60, 0.02, 32), 0, 1))
    b = list(np.clip(rng.normal(0.95, 0.02, 32), 0, 1))
    one = build(_results([_cell(0, a)]), "bit_accuracy")["entries"][0]["per_attack_summary"]["none"]
    two = build(_results([_cell(0, a), _cell(1, b)]), "bit_accuracy")["entries"][0]["per_attack_summary"]["none"]
    assert one["n_attack_runs"] == 1 and two["n_attack_runs"] == 2
    assert (one["value"], one["low"], one["high"]) == pytest.approx(
        (np.mean(a), stats.bootstrap(a).low, stats.bootstrap(a).high))  # one run: its stored interval
    assert two["high"] - two["low"] > 5 * (one["high"] - one["low"])
    assert two["low"] < np.mean(a) + 0.01 and two["high"] > np.mean(b) - 0.01


def _grid(rng) -> tuple[list[CellRow], list[list[list[float]]], list[list[list[float]]]]:
    """Two run seeds x two attack seeds: seed 0's runs near 0.95, seed 1's near 0.55 (the embedding decides);
    the utility the same way round."""
    det = [[list(np.clip(rng.normal(m, 0.02, 32), 0, 1)) for _ in range(2)] for m in (0.95, 0.55)]
    util = [[list(map(float, rng.random(32) < p)) for _ in range(2)] for p in (0.8, 0.4)]
    cells = [_cell(k, det[s][k], seed=s, utility=util[s][k]) for s in range(2) for k in range(2)]
    return cells, det, util


def test_attack_runs_are_nested_in_their_run_seed_in_leaderboard_curves_and_answer():
    """Two run seeds x two attack seeds: every aggregate (the leaderboard's column, the utility curve's point, the
    answer section's cell) is the three-level bootstrap (run seeds, then their attack runs, then images) of the
    stored per-image values: two embeddings, four attack runs."""
    from markbench.reports.answer import build as answer
    from markbench.reports.leaderboard import utility_curves

    cells, det, util = _grid(np.random.default_rng(4))
    res = _results(cells)
    ref, ref_u = stats.hierarchical_bootstrap(det), stats.hierarchical_bootstrap(util)
    s = build(res, "bit_accuracy")["entries"][0]["per_attack_summary"]["none"]
    assert (s["n_embeddings"], s["n_attack_runs"], s["n"]) == (2, 4, 128)
    assert (s["value"], s["low"], s["high"]) == pytest.approx((ref.value, ref.low, ref.high))
    # independently: the value is the mean over seeds of the mean over their runs, and the interval spans both
    # embeddings (a quarter of the replicates draw one embedding twice)
    assert s["value"] == pytest.approx(np.mean([np.mean([np.mean(r) for r in seed]) for seed in det]))
    assert s["low"] < 0.57 and s["high"] > 0.93
    (curve,) = [c for c in utility_curves(res) if c["metric"] == "bit_accuracy"]
    (pt,) = curve["lines"]["alpha"]
    assert (pt["y"]["low"], pt["y"]["high"]) == pytest.approx((ref.low, ref.high))
    assert (pt["x"]["value"], pt["x"]["low"], pt["x"]["high"]) == pytest.approx((ref_u.value, ref_u.low, ref_u.high))
    entry = answer(res, reported=[])["rows"][0]["cells"]["lora(steps=200)"]
    assert entry["n_embeddings"] == 2
    assert (entry["detection"]["low"], entry["detection"]["high"]) == pytest.approx((ref.low, ref.high))
    assert (entry["utility"]["low"], entry["utility"]["high"]) == pytest.approx((ref_u.low, ref_u.high))


def test_a_columns_ranking_value_nests_attack_runs_like_its_interval():
    """Run seed 0 with three attack runs and run seed 1 with one: the column's value in the ranking (per_attack,
    robustness mean and worst) is the mean over run seeds of each seed's mean over its attack runs, the value its
    interval reports, not the flat mean of the four runs (which would weigh the repeated seed three times)."""
    runs = {(0, 0): 0.5, (0, 1): 0.6, (0, 2): 0.7, (1, 0): 0.9}
    cells = [_cell(a, [v] * 8, seed=s) for (s, a), v in runs.items()]
    entry = build(_results(cells), "bit_accuracy")["entries"][0]
    nested = (np.mean([0.5, 0.6, 0.7]) + 0.9) / 2
    assert entry["per_attack"]["none"] == pytest.approx(nested)
    assert entry["per_attack"]["none"] != pytest.approx(np.mean(list(runs.values())))
    assert entry["robustness"]["mean"] == pytest.approx(nested) == entry["robustness"]["worst"]
    assert entry["robustness"]["worst_attack"] == "none"
    assert entry["per_attack_summary"]["none"]["value"] == pytest.approx(nested)
