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


def _cell(attack_seed: int, samples: list[float], seed: int = 0) -> CellRow:
    label = "lora(steps=200)" + (f" a{attack_seed}" if attack_seed else "")
    row = CellRow(cell_id=f"c{seed}{attack_seed}", run_id="r", label=label, seed=seed, defense="alpha",
                  defense_label="alpha", defense_params={}, defense_version="1", defense_origin="markbench",
                  model_attack="lora", model_attack_label=label, model_attack_params={"steps": 200},
                  model_attack_version="1", image_attack="none", image_attack_label="none", image_attack_params={},
                  image_attack_version="1", negatives="attacked", n_images=len(samples), status="ok", error="",
                  traceback="", timings={}, costs={}, stage_keys=[], updated=0.0)
    v = Value(float(np.mean(samples)), None, None, len(samples), "", True, tuple(samples))
    row.metrics["bit_accuracy"] = v
    return row


def _results(cells: list[CellRow]) -> Results:
    return Results(path=Path("x"), runs=[], cells=cells, metric_order=["bit_accuracy"], notes={})


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
