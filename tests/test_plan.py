"""Planner expansion and cache keys."""

from __future__ import annotations

import textwrap

import pytest

from markbench.cache import stable_hash
from markbench.config import load_config
from markbench.plan import build_plan, image_seed, stage_seed

from .conftest import MICRO_TOML, write_config


def _plan(tmp_path, text=MICRO_TOML, overrides=None, name="bench.toml"):
    return build_plan(load_config(write_config(tmp_path, text, name=name), overrides or {}))


def test_expansion_counts(tmp_path):
    plan = _plan(tmp_path, overrides={"run.seeds": [0, 1]})
    assert len(plan.cells) == 2 * 1 * 3 * 2  # defences x model attacks x image attacks x seeds
    kinds = [s.kind for s in plan.stages.values()]
    assert kinds.count("generate") == 2  # one plain generation per seed, shared by every defence
    assert kinds.count("mark") == 2 and kinds.count("embed") == 4
    assert kinds.count("image_attack") == 2 * 2 * 2  # 2 jpeg settings x {plain, marked} x seeds
    labels = {c.label for c in plan.cells}
    assert "dwtdctsvd/none/jpeg(quality=90)/s1" in labels


def test_same_inputs_same_keys(tmp_path):
    a = _plan(tmp_path)
    b = _plan(tmp_path, name="copy.toml")
    assert list(a.stages) == list(b.stages) and [c.key for c in a.cells] == [c.key for c in b.cells]


@pytest.mark.parametrize("override, changed_kinds", [
    ({"run.num_images": 5}, {"generate", "mark", "image_attack", "detect"}),
    ({"model.num_inference_steps": 3}, {"generate", "mark", "image_attack", "detect"}),
    ({"run.seeds": [7]}, {"embed", "generate", "mark", "image_attack", "detect"}),
])
def test_any_change_gives_new_keys(tmp_path, override, changed_kinds):
    base = _plan(tmp_path)
    other = _plan(tmp_path, overrides=override, name="other.toml")
    new = {s.kind for k, s in other.stages.items() if k not in base.stages}
    assert changed_kinds <= new


def test_plugin_parameter_change_changes_only_downstream_keys(tmp_path):
    base = _plan(tmp_path)
    other = _plan(tmp_path, MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "dwtdctsvd"\nbits = 32'), name="o.toml")
    new = [s for k, s in other.stages.items() if k not in base.stages]
    assert {s.kind for s in new} == {"embed", "mark", "image_attack", "detect"}
    assert all(s.plugin is None or s.plugin.name in ("dwtdctsvd", "jpeg") for s in new)
    # the control and the plain generation are untouched
    assert all(s.plugin is None or s.plugin.name != "none" for s in new)


def test_plugin_version_is_part_of_the_key(tmp_path, monkeypatch):
    from markbench import image_attacks

    base = _plan(tmp_path)
    monkeypatch.setattr(image_attacks.get("jpeg"), "version", "999")
    other = _plan(tmp_path, name="v.toml")
    assert {s.kind for k, s in other.stages.items() if k not in base.stages} == {"image_attack", "detect"}


def test_seeds_are_functions_of_run_seed_and_key_only():
    assert image_seed(0, 3) == image_seed(0, 3) != image_seed(1, 3)
    assert stage_seed(0, "abc") == stage_seed(0, "abc") != stage_seed(0, "abd")
    assert stable_hash({"a": 1, "b": [1.5, "x"]}) == stable_hash({"b": [1.5, "x"], "a": 1})


def test_only_pattern_selects_cells(tmp_path):
    plan = _plan(tmp_path)
    assert {c.label for c in plan.select("dwtdctsvd/*")} == {
        "dwtdctsvd/none/none/s0", "dwtdctsvd/none/jpeg(quality=90)/s0", "dwtdctsvd/none/jpeg(quality=50)/s0"}
    assert len(plan.select("quality=90")) == 2  # substring when there is no wildcard
    closure = plan.closure(plan.select("none/none/none/s0"))
    assert {s.kind for s in closure} == {"base", "embed", "generate", "detect"}


def test_clean_negative_policy_uses_unattacked_base_images(tmp_path):
    plan = _plan(tmp_path, overrides={"run.negatives": "clean"})
    jpeg_cells = [c for c in plan.cells if c.image_attack.name == "jpeg"]
    assert all(plan.stages[c.negatives].kind == "generate" for c in jpeg_cells)
    attacked = _plan(tmp_path, name="a.toml")
    jpeg_cells = [c for c in attacked.cells if c.image_attack.name == "jpeg"]
    assert all(attacked.stages[c.negatives].kind == "image_attack" for c in jpeg_cells)


@pytest.mark.parametrize("negatives", ["attacked", "clean"])
def test_white_box_negatives_run_the_verifier_on_the_clean_model(tmp_path, negatives):
    """WDM verifies by its own trigger-fed generation: its null is that generation on the clean model."""
    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "wdm"').replace(
        "target_fprs", f'negatives = "{negatives}"\ntarget_fprs')
    plan = _plan(tmp_path, text)
    base = next(k for k, s in plan.stages.items() if s.kind == "base")
    for cell in plan.cells:
        neg_src = plan.stages[cell.negatives]
        if cell.image_attack.name != "none" and negatives == "attacked":
            assert neg_src.kind == "image_attack"
            neg_src = plan.stages[neg_src.inputs[0]]
        if cell.defense.name == "wdm":
            assert neg_src.kind == "generate" and neg_src.plugin is not None and neg_src.plugin.name == "wdm"
            assert neg_src.inputs == (base, cell.embed)  # the clean model, the same secret
            assert dict(neg_src.extra)["variant"] == cell.variant
            pos = plan.stages[cell.unattacked]
            assert pos.inputs[0] == cell.embed and pos.key != neg_src.key
        else:  # black-box defences keep the clean model's plain images
            assert neg_src.kind == "generate" and neg_src.plugin is None


def test_run_prompts_and_size_are_in_the_key_of_plugins_that_read_them(tmp_path):
    """hidden trains on images generated for the run's prompts: other prompts must give another embedding."""
    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "hidden"')
    embeds = lambda plan: {s.plugin.name: k for k, s in plan.stages.items() if s.kind == "embed"}  # noqa: E731
    a = embeds(_plan(tmp_path, text))
    b = embeds(_plan(tmp_path, text.replace('set = "micro:shapes"', 'list = ["a red circle on a grey background"]')))
    c = embeds(_plan(tmp_path, text, overrides={"model.height": 32, "model.width": 32}))
    assert a["hidden"] != b["hidden"] and a["hidden"] != c["hidden"]
    assert a["none"] == b["none"] == c["none"]  # a defence that reads neither keeps its key


@pytest.mark.parametrize("defense", ["sleepermark", "wdm"])
def test_a_trigger_defences_twin_is_its_own_generation_on_the_clean_model(tmp_path, defense):
    """SleeperMark's marked images are compared with the clean model given the trigger, not the plain prompt: the
    twin is the defence's generation (same variant, same secret) on the equally attacked clean weights."""
    text = MICRO_TOML.replace('name = "dwtdctsvd"', f'name = "{defense}"')
    plan = _plan(tmp_path, text)
    base = next(k for k, s in plan.stages.items() if s.kind == "base")
    cells = [c for c in plan.cells if c.defense.name == defense]
    assert {c.variant for c in cells} == {"", "no_trigger"}
    for cell in cells:
        twin = plan.stages[cell.twins]
        assert twin.kind == "generate" and twin.plugin.name == defense
        assert twin.inputs == (base, cell.embed) and dict(twin.extra)["variant"] == cell.variant
        assert cell.twins != cell.clean_twins and cell.twins != cell.unattacked
        if defense == "wdm":  # shared with the white-box null (attacked negatives, no image attack)
            if cell.image_attack.name == "none":
                assert cell.twins == cell.negatives
        assert cell.twins in {s.key for s in plan.closure([cell])}
    # one twin stage per variant (shared by the image-attack columns)
    assert len({c.twins for c in cells}) == 2


def test_post_hoc_plain_and_initial_noise_defences_use_the_clean_models_ordinary_images(tmp_path):
    import tests.plugins_for_tests  # noqa: F401  (registers _test_sleeper, an initial-noise defence)
    from markbench.registries import defenses

    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "_test_sleeper"')
    plan = _plan(tmp_path, text)
    for cell in plan.cells:
        assert cell.twins == cell.clean_twins  # dwtdct: the unmarked images; none: itself; the noise mark: unpaired
    assert not defenses.get("_test_sleeper").has_paired_twin()
    assert defenses.get("dwtdct").has_paired_twin() and defenses.get("sleepermark").has_paired_twin()


def test_a_merge_of_two_marked_models_gets_a_second_independent_embedding(tmp_path):
    """merge(other = 'marked') takes a second embedding of the same defence (its own stage key, so another key
    drawn) as an extra input; the control `none`, which leaves the weights alone, gets the clean base instead; other
    merges plan no second embedding."""
    import tests.plugins_for_tests  # noqa: F401  (registers _test_weightmark, a weight-marking defence)

    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "_test_weightmark"') + textwrap.dedent('''
        [[model_attacks]]
        name = "merge"
        other = ["marked", "base"]
        ''')
    plan = _plan(tmp_path, text)
    embeds = [s for s in plan.stages.values() if s.kind == "embed" and s.plugin.name == "_test_weightmark"]
    assert len(embeds) == 2 and embeds[0].key != embeds[1].key
    first, second = sorted(embeds, key=lambda s: "release" in s.extra_dict)
    merges = [s for s in plan.stages.values() if s.kind == "model_attack"]
    marked = [s for s in merges if s.plugin.param_dict["other"] == "marked"]
    plain = [s for s in merges if s.plugin.param_dict["other"] == "base"]
    base = next(s.key for s in plan.stages.values() if s.kind == "base")
    # the marked model merged with the second release; its clean twin (the clean base) attacked the same way; the
    # control `none` merged with what a second release of it is: the clean base
    assert {s.inputs for s in marked} == {(first.key, second.key), (base, second.key), (base, base)}
    assert all(len(s.inputs) == 1 for s in plain)
