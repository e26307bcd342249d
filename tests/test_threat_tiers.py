"""Threat tiers of model attacks: only a trigger-known attack's stage ever sees a defence's trigger, and nothing
else of its secret; the tier travels with every cell; the tiered attacks do what they claim."""

from __future__ import annotations

import pytest
import torch

from markbench import DefenseKnowledge, ModelAttack, Secret, SecretAccessError, ThreatTier, Trigger, model_attacks
from markbench.registries import defenses
from markbench.config import load_config
from markbench.plan import build_plan
from markbench.plugins import threat_scope
from markbench.stages import StageEnv
from markbench.testing import knowledge_for, make_context

from .conftest import write_config

TIERS_TOML = """
metrics = ["bit_accuracy"]

[run]
output = "{output}"
seeds = [0]
num_images = 2
batch_size = 2
primary_metric = "bit_accuracy"

[model]
builtin = "micro-sd"
height = 64
width = 64
num_inference_steps = 2

[prompts]
set = "micro:shapes"

[[defenses]]
name = "none"

[[defenses]]
name = "sleepermark"

[[model_attacks]]
name = "finetune"

[[model_attacks]]
name = "fine_prune"

[[model_attacks]]
name = "prompt_sanitise"

[[model_attacks]]
name = "trigger_search"

[[model_attacks]]
name = "unlearn"

[[image_attacks]]
name = "none"
"""


def test_each_tiers_view_gives_exactly_what_the_tier_allows():
    trig = Trigger(prompt_prefix="*[Z]& ")
    blind = DefenseKnowledge(ThreatTier.BLIND, method="sleepermark", trigger=trig)
    method = DefenseKnowledge("method_known", method="sleepermark", trigger=trig)
    known = DefenseKnowledge("trigger_known", method="sleepermark", trigger=trig)
    for view in (blind, method):
        with pytest.raises(SecretAccessError):
            view.trigger()
        assert view._trigger is None  # not even stored: the sealed view holds nothing to dig out
    assert blind.method is None and method.method == "sleepermark"
    assert known.trigger().prompt_prefix == "*[Z]& "
    for view in (blind, method, known):
        with pytest.raises(SecretAccessError):
            view.secret()
        with pytest.raises(SecretAccessError):
            view._trigger = trig  # read-only


def test_a_stage_context_is_blind_unless_the_harness_says_otherwise():
    ctx = make_context(0)
    assert ctx.knowledge.tier is ThreatTier.BLIND
    with pytest.raises(SecretAccessError):
        ctx.knowledge.trigger()


class _Peeker(ModelAttack):
    """A blind attack that tries to read the trigger."""

    name = "peeker"
    version = "1"

    def apply(self, pipe, ctx):
        return ctx.knowledge.trigger()


def test_a_blind_attack_that_reads_the_trigger_fails_even_when_given_one():
    ctx = make_context(0, knowledge=knowledge_for(_Peeker, trigger=Trigger(prompt_prefix="*[Z]& ")))
    with pytest.raises(SecretAccessError):
        _Peeker().apply(None, ctx)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    cfg = load_config(write_config(tmp_path_factory.mktemp("tiers"), TIERS_TOML))
    return cfg, build_plan(cfg)


def _attack_stages(plan, name):
    return [s for s in plan.stages.values() if s.kind == "model_attack" and s.plugin.name == name]


def test_only_the_trigger_known_attacks_stage_reads_a_secret(planned, monkeypatch):
    cfg, plan = planned
    env = StageEnv(cfg, plan, store=None)
    read: list[str] = []

    def secret(key):
        read.append(key)
        return Secret({"message": torch.ones(48)}, {"trigger": "*[Z]& "})

    monkeypatch.setattr(env, "secret", secret)
    embeds = {s.plugin.name: s.key for s in plan.stages.values() if s.kind == "embed"}
    for name in ("finetune", "fine_prune", "prompt_sanitise", "trigger_search"):
        assert _attack_stages(plan, name)
        for stage in _attack_stages(plan, name):
            assert len(stage.inputs) == 1  # no embedding among its inputs
            view = env.knowledge(stage, env.plugin(stage.plugin))
            with pytest.raises(SecretAccessError):
                view.trigger()
    assert read == []
    unlearn = _attack_stages(plan, "unlearn")
    # sleepermark: its marked and its clean model; "none" marks no weights, so its model is the clean one: three
    # stages, each depending on its defence's embedding
    assert len(unlearn) == 3 and {s.inputs[1] for s in unlearn} == set(embeds.values())
    for stage in unlearn:
        view = env.knowledge(stage, env.plugin(stage.plugin))
        trig = view.trigger()
        if stage.inputs[1] == embeds["sleepermark"]:
            assert trig.prompt_prefix == "*[Z]& "
        else:
            assert trig is None  # the "none" defence has no trigger
    assert sorted(read) == sorted([embeds["sleepermark"]] * 2 + [embeds["none"]])


def test_a_blind_attack_on_the_clean_model_is_one_stage_for_every_defence(planned):
    _, plan = planned
    base = next(s.key for s in plan.stages.values() if s.kind == "base")
    on_base = {name: [s for s in _attack_stages(plan, name) if s.inputs[0] == base]
               for name in ("finetune", "fine_prune", "unlearn")}
    assert len(on_base["finetune"]) == 1  # it knows nothing of the defence, so its key cannot depend on it
    assert len(on_base["fine_prune"]) == 2 and len(on_base["unlearn"]) == 2  # one per defence


def test_the_tier_is_stored_with_each_cell_and_a_service_attack_needs_no_weights():
    sm, dwt = defenses.get("sleepermark"), defenses.get("dwtdctsvd")
    assert threat_scope(sm, model_attacks.get("unlearn"))["tier"] == "trigger_known"
    assert threat_scope(sm, model_attacks.get("fine_prune"))["tier"] == "method_known"
    assert threat_scope(sm, model_attacks.get("trigger_search"))["tier"] == "method_known"
    assert threat_scope(sm, model_attacks.get("finetune"))["tier"] == "blind"
    assert "tier" not in threat_scope(sm, model_attacks.get("none"))
    served = threat_scope(dwt, model_attacks.get("prompt_sanitise"))  # an API-served defence
    assert served["model_attack_needs"] == "service" and served["outside"] is False
    assert threat_scope(dwt, model_attacks.get("finetune"))["outside"] is True


def test_the_matrix_tags_a_column_with_its_tier():
    import json

    import pandas as pd

    from markbench.cli import matrix

    rows = [dict(metric="tpr", status="ok", model_attack_label=ma, image_attack_label="none", seed=0,
                 defense_label="sleepermark", value=v, low=None, high=None, n=8, note="",
                 threat_json=json.dumps({"tier": tier} if tier else {}))
            for ma, tier, v in (("none", "", 1.0), ("finetune", "blind", 0.9), ("unlearn", "trigger_known", 0.1))]
    _, _, cols = matrix(pd.DataFrame(rows), "tpr")
    assert cols == ["none | none", "finetune | none", "unlearn <trigger_known> | none"]


def test_prompt_sanitise_drops_the_trigger_and_keeps_the_words():
    attack = model_attacks.get("prompt_sanitise")()
    assert attack.serve_prompt("*[Z]& a red circle, on a sky-blue background.") == \
        "a red circle, on a sky-blue background."
    assert attack.serve_prompt("a cat 42 [x] don't") == "a cat don't"
    assert model_attacks.get("prompt_sanitise")(mode="alnum").serve_prompt("*[Z]& 3 cats") == "3 cats"


def test_a_served_models_images_go_through_its_prompt_filter(planned):
    cfg, plan = planned
    env = StageEnv(cfg, plan, store=None)
    served = _attack_stages(plan, "prompt_sanitise")[0]
    fn = env.prompt_filter(served.key)
    assert fn is not None and fn("*[Z]& a red circle") == "a red circle"
    assert env.prompt_filter(_attack_stages(plan, "finetune")[0].key) is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prompt_prefix", "input_shift"])
def test_unlearn_brings_the_triggered_prediction_to_the_trigger_free_one(kind):
    """On micro-sd: after unlearning, the UNet's prediction with the trigger is closer to the original model's
    trigger-free prediction than before (on the attack's own images, at four noise draws and timesteps each).
    Measured (seeded, so reproducible): 0.00216 -> 0.00180 (prefix) and 0.0176 -> 0.0156 (input shift) in 10 steps
    at lr 1e-4; larger learning rates drift the random micro model more than they close the gap."""
    import copy

    from markbench.testing import copy_pipeline, micro_pipeline
    from markbench.training import add_noise, encode_images, encode_prompts

    pipe = copy_pipeline(micro_pipeline())
    frozen = copy.deepcopy(pipe.unet)
    c = pipe.unet.config.in_channels
    g = torch.Generator().manual_seed(3)
    trig = Trigger(prompt_prefix="*[Z]& ") if kind == "prompt_prefix" else \
        Trigger(latent=torch.randn(c, 8, 8, generator=g), mix=0.8)
    ctx = make_context(0, pipe=pipe, knowledge=DefenseKnowledge("trigger_known", trigger=trig))
    images, captions = ctx.data.dataset("tiny:train", 4)
    z0 = encode_images(pipe, images).repeat(4, 1, 1, 1)
    noisy, _, t = add_noise(pipe.scheduler, z0, torch.Generator().manual_seed(99))
    caps = (captions if kind == "prompt_prefix" else [""] * 4) * 4
    cond = encode_prompts(pipe, caps)
    cond_trig = encode_prompts(pipe, ["*[Z]& " + x for x in caps]) if kind == "prompt_prefix" else cond
    x_trig = noisy if kind == "prompt_prefix" else 0.8 * noisy + 0.2 * trig.latent[None]

    def gap(unet):
        with torch.no_grad():
            return float(((unet(x_trig, t, encoder_hidden_states=cond_trig).sample
                           - frozen(noisy, t, encoder_hidden_states=cond).sample) ** 2).mean())

    before = gap(pipe.unet)
    model_attacks.get("unlearn")(steps=10, lr=1e-4, num_images=4, batch_size=4).apply(pipe, ctx)
    after = gap(pipe.unet)
    assert after < 0.9 * before, (before, after)
    assert ctx.costs["steps"] == 10 and ctx.costs["trigger_kind"] == kind


@pytest.mark.parametrize("position, expected", [("prefix", "*[Z]& a red circle"), ("suffix", "a red circle *[Z]&")])
def test_sleepermark_known_trigger_is_where_its_embedding_puts_it(position, expected):
    """A trigger-known attacker gets the trigger text at its embedding's position, exactly as SleeperMark prompts."""
    sm = defenses.get("sleepermark")()
    secret = Secret({}, {"trigger": "*[Z]& ", "trigger_position": position})
    trigger = sm.known_trigger(secret)
    assert trigger.apply("a red circle") == expected == sm.triggered("a red circle", "*[Z]& ", position)
    assert trigger.in_prompt and trigger.latent is None
