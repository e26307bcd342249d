"""Smoke tests parametrized over the registries: a newly registered plugin is exercised without a new test.

Plugins may declare ``smoke_params`` (e.g. few training steps) so this stays fast.
"""

from __future__ import annotations

import pytest
import torch

from bench import defenses, metrics, model_attacks
from bench.config import ModelConfig
from bench.generation import generate_images
from bench.models import load_pipeline
from bench.plugins import (Detection, DetectionKind, Embedding, GenerationRequest, MarkLocation, MeasureContext,
                           Measurement, StageContext)
from bench.stages import Resources, check_detection, check_images, copy_pipeline


def _public(names):
    return [n for n in names if not n.startswith("_test")]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(ModelConfig(builtin="micro-sd"))


@pytest.fixture(scope="module")
def request_():
    return GenerationRequest(prompts=("a red circle on a blue background",) * 2, seeds=(1, 2), height=64, width=64,
                             num_inference_steps=2, guidance_scale=7.5, batch_size=2)


def _ctx(seed=0, pipe=None):
    data = Resources(lambda: pipe, 64, 64, lambda: ["a red circle on a blue background"]) if pipe else None
    return StageContext(torch.Generator().manual_seed(seed), data=data)


@pytest.mark.parametrize("name", _public(defenses.names()))
def test_defense_embeds_generates_detects(name, pipe, request_):
    cls = defenses.get(name)
    d = cls(**cls.smoke_params)
    emb = d.embed(copy_pipeline(pipe), _ctx(0, pipe))
    assert isinstance(emb, Embedding)
    model = emb.pipeline or pipe
    if cls.location is MarkLocation.POST_HOC:
        images = d.mark(generate_images(pipe, request_), emb.secret, _ctx(1))
    else:
        images = d.generate(model, emb.secret, request_, _ctx(1))
    images = check_images(images, name, (2, 3, 64, 64))
    n_bits = d.message(emb.secret).numel() if cls.detection is DetectionKind.BITS else None
    det = check_detection(d.detect(emb.secret, images, _ctx(2)), name, 2, cls.detection, n_bits)
    again = d.detect(emb.secret, images, _ctx(2))
    if det.bits is not None:
        assert torch.equal(det.bits, again.bits.bool())  # detection is deterministic
    # a different seed gives a different secret
    other = d.embed(copy_pipeline(pipe), _ctx(5, pipe))
    if cls.detection is DetectionKind.BITS:
        assert not torch.equal(d.message(emb.secret), d.message(other.secret))


@pytest.mark.parametrize("name", _public(model_attacks.names()))
def test_model_attack_returns_a_working_pipeline(name, pipe, request_):
    cls = model_attacks.get(name)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ctx = _ctx(0, pipe)
    attacked = cls(**cls.smoke_params).apply(copy_pipeline(pipe), ctx)
    images = generate_images(attacked, request_)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    # the input pipeline (the harness's cached model) is never changed in place
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    if not cls.identity:
        assert "steps" in ctx.costs  # every attack reports its cost


@pytest.mark.parametrize("name", _public(metrics.names()))
def test_metric_computes_on_a_synthetic_cell(name):
    g = torch.Generator().manual_seed(0)
    message = torch.randint(0, 2, (48,), generator=g).bool()
    pos = message.repeat(8, 1)
    pos[:, :3] = ~pos[:, :3]  # 45 of 48 bits right
    neg = torch.randint(0, 2, (8, 48), generator=g).bool()
    imgs = torch.rand(8, 3, 32, 32, generator=g)
    defense = defenses.get("none")()
    ctx = MeasureContext(defense=defense, detection=Detection(bits=pos), negatives=Detection(bits=neg),
                         message=message, target_fprs=(1e-6,), generator=g,
                         loaders={"images": lambda: imgs, "unattacked": lambda: imgs, "clean_twins": lambda: imgs,
                                  "reference": lambda: imgs, "twins": lambda: imgs, "ordinary_marked": lambda: imgs},
                         prompts=("a red circle on a blue background",) * 8,
                         model_attack=model_attacks.get("prune")())  # a model-attacked cell: attacker utility
    cls = metrics.get(name)
    out = cls(**cls.smoke_params).compute(ctx)
    assert out and all(isinstance(m, Measurement) and m.n > 0 for m in out)
    by = {m.name: m for m in out}
    if "bit_accuracy" in by:
        assert by["bit_accuracy"].value == pytest.approx(45 / 48)
    if "tpr@1e-06" in by:
        assert by["tpr@1e-06"].value == 1.0
