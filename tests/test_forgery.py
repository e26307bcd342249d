"""The forgery axis and the attacker's joint success (issue 27): planner, stages, metrics and reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from markbench.config import load_config
from markbench.plan import build_plan

from .conftest import MICRO_TOML, write_config

FORGE_TOML = MICRO_TOML.replace(
    'metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]',
    'metrics = ["bit_accuracy", "tpr", "auc", "psnr", "ssim", "forgery", "joint_evasion"]',
) + """
[[image_attacks]]
name = "averaging"
images = 4
mode = ["remove", "forge"]
"""


def _plan(tmp_path, text=FORGE_TOML):
    return build_plan(load_config(write_config(tmp_path, text), {}))


def test_forgery_cells_forge_the_clean_images_with_the_marked_ones_and_detect_them_against_the_same_clean_images(
        tmp_path):
    plan = _plan(tmp_path)
    forged = [c for c in plan.cells if c.axis == "forgery"]
    removal = [c for c in plan.cells if c.axis == "removal"]
    assert len(forged) == 2 and len(removal) == 2 * 4  # two defences x (none, jpeg x2, averaging remove)
    for c in forged:
        stage = plan.stages[c.images]
        assert stage.kind == "forge"
        # inputs: the clean images to forge, then the marked images the attacker learns from
        assert c.negatives == c.clean_twins == c.unattacked == stage.inputs[0]
        marked = next(r for r in removal if r.defense == c.defense and r.image_attack.name == "jpeg")
        assert stage.inputs[1] == marked.unattacked
        assert plan.stages[c.detect_neg].inputs == (c.embed, c.clean_twins)


def test_adding_a_forgery_attack_changes_no_key_of_the_grid_without_it(tmp_path):
    without = build_plan(load_config(write_config(tmp_path, MICRO_TOML.replace(
        '"pvalue", ', ''), name="a.toml"), {}))
    with_forgery = _plan(tmp_path)
    assert set(without.stages) <= set(with_forgery.stages)
    removal_keys = {c.key for c in with_forgery.cells if c.axis == "removal" and c.image_attack.name == "jpeg"}
    # the metric list differs (cell keys name the metrics), so compare the stage keys of the jpeg cells instead
    for c in without.cells:
        twin = next(x for x in with_forgery.cells if x.label == c.label)
        assert twin.stage_keys() == c.stage_keys()
    assert removal_keys


def test_averaging_mode_at_its_default_stays_out_of_the_key():
    from markbench.registries import image_attacks

    cls = image_attacks.get("averaging")
    from markbench.config import PluginSpec

    spec = PluginSpec("image_attacks", "averaging", (("blur_sigma", 1.5), ("images", 11), ("mode", "remove"),
                                                     ("strength", None)), cls.version)
    assert "mode" not in spec.identity()["params"]


def test_averaging_forgery_adds_the_leave_one_out_pattern_and_raises_a_fixed_pattern_detector():
    """An independent reference: a fixed +-4/255 pattern on smooth images; the forged images carry it."""
    from markbench import AttackContext
    from markbench.registries import image_attacks

    g = torch.Generator().manual_seed(0)
    pattern = ((torch.rand(1, 3, 32, 32, generator=g) > 0.5).float() * 2 - 1) * 4 / 255
    smooth = torch.nn.functional.interpolate(torch.rand(64, 3, 4, 4, generator=g), size=32, mode="bilinear")
    smooth = smooth * 0.5 + 0.25
    marked, clean = smooth[:32] + pattern, smooth[32:]
    a = image_attacks.get("averaging")(mode="forge", images=32)
    ctx = AttackContext()
    forged = a.forge(clean, marked, g, ctx)
    assert ctx.costs == {"attacker_images": 32, "model_evals": 0}

    def corr(x):  # a keyed detector's score: correlation with the pattern
        return ((x - x.mean((1, 2, 3), keepdim=True)) * pattern).flatten(1).sum(1) / pattern.square().sum()

    assert corr(forged).mean() > 0.5 and corr(clean).abs().mean() < 0.2
    # leave-one-out: forged image 0 does not depend on marked image 0
    other = marked.clone()
    other[0] = smooth[0]
    again = a.forge(clean, other, g, AttackContext())
    assert torch.allclose(again[0], forged[0], atol=1e-6) and (again[1] - forged[1]).abs().max() > 1e-4
    # 32 images estimate the pattern better than 2
    few = image_attacks.get("averaging")(mode="forge", images=2).forge(clean, marked, g, AttackContext())
    assert corr(forged).mean() > corr(few).mean()


def test_forgery_and_joint_evasion_metrics_count_per_image_decisions_against_a_hand_count():
    from markbench.measures.forgery import Forgery, JointEvasion
    from markbench.plugins import Detection, DetectionKind, MeasureContext

    class D:
        name = "fake"
        detection = DetectionKind.BITS

    msg = torch.ones(48, dtype=torch.bool)
    matches = [48, 41, 40, 10]  # tau(1e-6) = 41: the first two are accepted
    bits = torch.stack([torch.arange(48) < m for m in matches])
    neg = torch.zeros(4, 48, dtype=torch.bool)
    clean = torch.full((4, 3, 16, 16), 0.5)
    images = clean.clone()
    images[1] += 0.2  # PSNR 14 dB: outside a 25 dB bound
    ctx = MeasureContext(defense=D(), detection=Detection(bits=bits), negatives=Detection(bits=neg), message=msg,
                         target_fprs=(1e-6,), generator=torch.Generator(), axis="forgery",
                         loaders={"images": lambda: images, "unattacked": lambda: clean})
    out = {m.name: m for m in Forgery().compute(ctx)}
    assert out["forged_fpr@1e-06"].value == pytest.approx(0.5) and out["clean_fpr@1e-06"].value == 0.0
    lo, hi = out["forged_fpr@1e-06"].low, out["forged_fpr@1e-06"].high
    from scipy.stats import beta

    assert lo == pytest.approx(beta.ppf(0.025, 2, 3)) and hi == pytest.approx(beta.ppf(0.975, 3, 2))
    joint = {m.name: m for m in JointEvasion(content=False).compute(ctx)}
    assert joint["joint_forgery@1e-06"].value == pytest.approx(0.25)  # image 0 only
    assert joint["quality_kept"].value == pytest.approx(0.75)
    ctx.axis = "removal"
    assert Forgery().compute(ctx) == []
    joint = {m.name: m for m in JointEvasion(content=False).compute(ctx)}
    assert joint["joint_evasion@1e-06"].value == pytest.approx(0.5)  # images 2 and 3 evade within the bound
    strict = {m.name: m for m in JointEvasion(content=False, min_psnr=0.0, min_ssim=1.0).compute(ctx)}
    assert strict["joint_evasion@1e-06"].value == pytest.approx(0.5)


@pytest.mark.slow
def test_a_run_with_a_forgery_stores_it_apart_with_its_cost_and_the_reports_show_it_separately(tmp_path):
    from markbench.runner import Runner
    from markbench.reports.data import load_results
    from markbench.reports import leaderboard

    cfg = load_config(write_config(tmp_path, FORGE_TOML), {})
    summary = Runner(cfg).run()
    assert summary.ok, summary.cells_failed
    res = load_results(cfg.output / "results.sqlite")
    assert {c.axis for c in res.cells} == {"removal"}
    forged = {c.defense_label: c for c in res.forgery_cells}
    assert set(forged) == {"none", "dwtdctsvd"}
    c = forged["dwtdctsvd"]
    assert "forged_fpr@1e-06" in c.metrics and "clean_fpr@1e-06" in c.metrics and "psnr_attack" in c.metrics
    assert c.costs["forge"]["attacker_images"] == 4 and c.costs["forge"]["seconds"] >= 0
    removal = next(x for x in res.cells if x.image_attack == "averaging")
    assert removal.costs["image_attack"]["attacker_images"] == 4
    assert "joint_evasion@1e-06" in removal.metrics
    from markbench.cli import matrix
    from markbench.store import ResultStore

    store = ResultStore(cfg.output / "results.sqlite")
    _, _, cols = matrix(store.dataframe(), "tpr@1e-06")
    store.close()
    assert cols[-1].startswith("forgery: averaging") and not any(c.startswith("forgery") for c in cols[:-1])
    board = leaderboard.build(res)
    assert all("forge" not in k for e in board["entries"] for k in e["per_attack"])
    assert {f["defense_label"] for f in board["forgery"]} == {"none", "dwtdctsvd"}
    md = leaderboard.to_markdown(board)
    assert "Forgery" in md and "joint success" in md
    from markbench.reports.html import render_report

    out = tmp_path / "report.html"
    render_report(cfg.output / "results.sqlite", out)
    page = out.read_text()
    assert 'id="attacker"' in page and "forged FPR@1e-06" in page and "joint evasion@1e-06" in page


SURROGATE_TOML = MICRO_TOML.replace('[[defenses]]\nname = "none"\n\n', '', 1).replace(
    'metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]',
    'metrics = ["bit_accuracy", "tpr", "psnr", "ssim", "forgery", "joint_evasion"]',
) + """
[[image_attacks]]
name = "adv_surrogate"
train_images = 6
train_steps = 5
steps = 3
mode = ["remove", "forge"]
"""


def test_adv_surrogate_trains_one_cached_surrogate_per_defence_on_the_attackers_own_images(tmp_path):
    plan = _plan(tmp_path, SURROGATE_TOML)
    surrogates = [s for s in plan.stages.values() if s.kind == "surrogate"]
    # one for the defence, shared by removal and forgery (only the training parameters key it)
    assert len(surrogates) == 1
    for s in surrogates:
        marked, clean = (plan.stages[k] for k in s.inputs)
        assert marked.kind == "mark" and clean.kind == "generate"  # dwtdctsvd is post-hoc: the service marks
        assert plan.stages[marked.inputs[0]].key == clean.key
        req = plan.named_requests[clean.extra_dict["request_name"]]
        assert len(req.prompts) == 6 and not set(req.seeds) & set(plan.requests[0].seeds)
    removal = next(c for c in plan.cells if c.axis == "removal" and c.image_attack.name == "adv_surrogate")
    attack, neg = plan.stages[removal.images], plan.stages[removal.negatives]
    assert attack.inputs[-1] == neg.inputs[-1] and plan.stages[attack.inputs[-1]].kind == "surrogate"
    forged = next(c for c in plan.cells if c.axis == "forgery")
    assert plan.stages[plan.stages[forged.images].inputs[-1]].kind == "surrogate"


def test_adv_surrogate_pgd_moves_the_surrogates_logit_the_way_the_mode_asks_more_than_random_signs():
    from markbench import AttackContext
    from markbench.registries import image_attacks
    from markbench.testing import sample_images, trained_surrogate

    a = image_attacks.get("adv_surrogate")(train_steps=150, steps=20, eps=8 / 255)
    tensors = trained_surrogate(a, 32)
    assert float(tensors["train_accuracy"]) > 0.9  # a fixed +-6/255 pattern is learnable
    net = a.load_surrogate(tensors)
    x = sample_images(6, 32, seed=90)
    ctx = AttackContext(surrogate=tensors)
    g = torch.Generator().manual_seed(1)
    removed, forged = a.apply(x, g, ctx), a.forge(x, x, g, ctx)
    signs = (x + (torch.randint(0, 2, x.shape, generator=g) * 2 - 1) * 8 / 255).clamp(0, 1)
    with torch.no_grad():
        logit = {k: net(v).squeeze(1) for k, v in (("x", x), ("removed", removed), ("forged", forged),
                                                      ("signs", signs))}
    assert float((removed - x).abs().max()) <= 8 / 255 + 1e-6
    assert float(logit["removed"].mean()) < float(logit["x"].mean()) - abs(float(logit["signs"].mean() -
                                                                             logit["x"].mean()))
    assert float(logit["forged"].mean()) > float(logit["x"].mean()) + abs(float(logit["signs"].mean() -
                                                                           logit["x"].mean()))
