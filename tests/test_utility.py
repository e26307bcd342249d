"""Attacker utility: the planner's utility images, the metric on real tiny-world images (a learnt style is
recognised, an unlearnt one is not), the quality kept against direct computations, and the threat-model labels."""

from __future__ import annotations

import pytest
import torch

from markbench import model_attacks
from markbench.config import load_config
from markbench.downstream import eval_captions, recognised, task_of
from markbench.worlds.tiny.downstream import Recogniser
from markbench.measures import fid, utility
from markbench.plan import build_plan
from markbench.plugins import Defense, Detection, DetectionKind, MeasureContext
from markbench.registries import metrics
from markbench.worlds.tiny import TINY_CLIP, shapes

from .conftest import MICRO_TOML, MODEL_ATTACKS_TOML, write_config

ATTACKS = MODEL_ATTACKS_TOML


def _plan(tmp_path, with_metric=True):
    text = MICRO_TOML + ATTACKS
    if with_metric:
        text = text.replace('"ssim"]', '"ssim", "attacker_utility"]')
    return build_plan(load_config(write_config(tmp_path, text, name=f"bench-{with_metric}.toml"), {}))


def test_the_planner_adds_utility_images_for_model_attacked_cells_only(tmp_path):
    plan = _plan(tmp_path)
    base = next(k for k, s in plan.stages.items() if s.kind == "base")
    by_attack = {}
    for cell in plan.cells:
        roles = dict(cell.extra_images)
        by_attack.setdefault(cell.model_attack.name, []).append(roles)
        assert set(roles.values()) <= {s.key for s in plan.closure([cell])}
    assert all(r == {} for r in by_attack["none"])  # no attack: no utility
    assert all(set(r) == {"ordinary_marked"} for r in by_attack["prune"])  # compression: the quality kept
    lora = by_attack["lora"]
    assert all(set(r) == {"ordinary_marked", "downstream_marked", "downstream_clean", "downstream_base"} for r in lora)
    # the unattacked base's downstream images are generated once, from the base model, on held-out style captions
    assert len({r["downstream_base"] for r in lora}) == 1
    stage = plan.stages[lora[0]["downstream_base"]]
    assert stage.inputs == (base,)
    request = plan.named_requests[dict(stage.extra)["request_name"]]
    assert list(request.prompts) == eval_captions(task_of("tiny:style"), 4)
    assert all("striped" in p for p in request.prompts)
    # without the metric nothing extra is generated
    assert all(c.extra_images == () for c in _plan(tmp_path, with_metric=False).cells)


class _Bits(Defense):
    detection = DetectionKind.BITS


def _ctx(attack, loaders, prompts=()):
    return MeasureContext(defense=_Bits(), detection=Detection(), negatives=Detection(), message=None,
                          target_fprs=(), generator=torch.Generator().manual_seed(0), loaders=loaders,
                          prompts=tuple(prompts), model_attack=attack)


def _images(split: str, n: int, seed: int = 1) -> torch.Tensor:
    arr, _, _ = shapes.make_dataset(split, n, seed=seed)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)


@pytest.mark.slow  # loading the shipped tiny CLIP alone takes 10-40 s on the shared 2-core machine
@pytest.mark.skipif(not (TINY_CLIP / "open_clip_model.safetensors").exists(), reason="tiny CLIP not built")
def test_a_learnt_style_is_recognised_and_an_unlearnt_one_is_not():
    """The real style images of the held-out captions stand for a model that learnt the style; plain (solid)
    images for one that did not. The metric must tell them apart, and agree with the recogniser image by image."""
    n = 24
    striped = _images("style", n)  # exactly the items of eval_captions(style, n)
    solid = _images("heldout", n)
    attack = model_attacks.get("lora")(steps=1)
    ms = {m.name: m for m in metrics.get("attacker_utility")(fid=False).compute(
        _ctx(attack, {"downstream_marked": lambda: striped, "downstream_clean": lambda: solid,
                      "downstream_base": lambda: solid}))}
    assert set(ms) == {"utility_downstream", "utility_downstream_clean", "utility_downstream_base"}
    hits = Recogniser.shared().striped_hits(striped, eval_captions(task_of("tiny:style"), n))
    assert ms["utility_downstream"].value == pytest.approx(hits.mean()) and ms["utility_downstream"].n == n
    assert ms["utility_downstream"].samples == tuple(float(h) for h in hits)  # per image, for the bootstrap
    assert ms["utility_downstream"].value >= 0.6  # the content gate's ceiling: 0.72 on 64 rendered style images
    assert ms["utility_downstream"].low > ms["utility_downstream_clean"].high  # beyond the intervals
    assert "the attacker has the released watermarked weights" in ms["utility_downstream"].note


@pytest.mark.slow  # the shipped tiny CLIP and its zero-shot classifier's text features
@pytest.mark.skipif(not (TINY_CLIP / "open_clip_model.safetensors").exists(), reason="tiny CLIP not built")
@pytest.mark.parametrize("task_name", ["tiny:style", "tiny:subject"])
def test_a_broken_model_is_not_credited_with_the_task(task_name):
    """Uniform noise and a flat grey image (what a fine-tune that broke the model draws) must not count as the new
    style or subject: without the content gate both read 'striped' on every caption. Rendered task images must."""
    n = 32
    task = task_of(task_name)
    caps = eval_captions(task, n)
    noise = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grey = torch.full((n, 3, 64, 64), 0.5)
    real = _images(task_name.split(":")[1], n)
    assert recognised(task, noise, caps).mean() <= 0.1
    assert recognised(task, grey, caps).mean() <= 0.1
    assert recognised(task, real, caps).mean() >= (0.6 if task_name == "tiny:style" else 0.9)


class _Fake(torch.nn.Module):
    def forward(self, images):
        x = torch.nn.functional.adaptive_avg_pool2d(images.double(), 2).flatten(1)
        return torch.cat([x, x ** 2], 1)


def test_quality_kept_is_the_fid_and_clip_change_against_the_clean_base(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "extractor", lambda *a, **k: _Fake())
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(6, 3, 16, 16, generator=g)
    marked = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    torch.manual_seed(3)
    from markbench.worlds.tiny import clip_model

    clip_model.save(clip_model.create(None), tmp_path / "clip")
    ctx = _ctx(model_attacks.get("prune")(), {"ordinary_marked": lambda: marked, "clean_twins": lambda: ref,
                                               "reference": lambda: ref}, prompts=["a red circle"] * 6)
    ms = {m.name: m for m in metrics.get("attacker_utility")(clip_pretrained=str(tmp_path / "clip")).compute(ctx)}
    assert set(ms) == {"utility_fid", "utility_fid_clean", "utility_clip_delta", "utility_clip_delta_clean"}
    f = _Fake()
    assert ms["utility_fid"].value == pytest.approx(fid.frechet_distance(f(marked), f(ref)))
    assert ms["utility_fid_clean"].value == pytest.approx(0.0, abs=1e-9)  # the clean model kept all its quality
    clip = metrics.get("clip_score")(pretrained=str(tmp_path / "clip"))
    delta = clip.scores(marked, ctx) - clip.scores(ref, ctx)
    assert ms["utility_clip_delta"].value == pytest.approx(delta.mean())
    # the per-image changes are stored (repeated attack runs combine by the hierarchical bootstrap)
    assert ms["utility_clip_delta"].samples == pytest.approx(tuple(delta.tolist()))
    assert ms["utility_clip_delta_clean"].samples == (0.0,) * 6
    assert ms["utility_clip_delta_clean"].value == 0.0
    # the unattacked model has no utility to report
    assert metrics.get("attacker_utility")().compute(_ctx(model_attacks.get("none")(), {})) == []


def test_merge_with_the_base_is_labelled_stronger_than_the_threat_model():
    base = model_attacks.get("merge")(other="base")
    finetuned = model_attacks.get("merge")(other="finetuned")
    assert base.exceeds_threat_model() and not finetuned.exceeds_threat_model()
    assert "STRONGER THAN THE THREAT MODEL" in utility.threat_note(base)
    assert "STRONGER" not in utility.threat_note(finetuned)
    assert not model_attacks.get("lora")().exceeds_threat_model()


@pytest.mark.parametrize("name", model_attacks.names())
def test_every_model_attack_states_what_the_attacker_has(name):
    if name.startswith("_"):
        pytest.skip("test plugin")
    cls = model_attacks.get(name)
    assert cls.attacker_has and cls.goal in ("", "downstream", "compression")
    attack = cls()
    if cls.goal == "downstream":
        assert task_of(attack.downstream_dataset(), attack.params.get("token")) is not None  # default data: tiny


def test_bench_ls_verbose_shows_the_threat_model(capsys, monkeypatch):
    from markbench.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # one table row per line: no wrapping
    assert main(["ls", "model-attacks", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.count("Attacker has:") == len(model_attacks.names())
    merge = next(line for line in out.splitlines() if "Stronger than the threat model" in line)
    assert "when other = 'base'" in merge


def test_recognition_needs_one_caption_per_image():
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        recognised(task_of("tiny:style"), torch.zeros(3, 3, 8, 8), ["a", "b"])
    assert task_of("/my/own/images") is None and task_of("tiny:subject").token == shapes.SUBJECT_TOKEN
