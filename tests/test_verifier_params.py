"""Verifier-only parameters (``param(..., verifier=True)``): keyed by the detect stage alone, so config entries that
differ only in how the verifier reads share one embedding and one set of images (a paired comparison)."""

from __future__ import annotations

import pytest

from markbench import ImageAttack, Param
from markbench.cli import main
from markbench.config import load_config
from markbench.errors import PluginValidationError
from markbench.plan import build_plan
from markbench.registries import defenses, image_attacks
from markbench.runner import Runner

from .conftest import write_config

#: Gaussian Shading at its smoke size on the micro world, read two ways (``{read}`` is the second entry's setting)
GS_TOML = """
metrics = ["bit_accuracy", "tpr"]

[run]
output = "{output}"
seeds = [0]
num_images = 2
batch_size = 2
target_fprs = [0.1]
primary_metric = "tpr@0.1"

[model]
builtin = "micro-sd"
height = 64
width = 64
num_inference_steps = 2

[prompts]
set = "micro:shapes"

[[defenses]]
name = "gaussian_shading"
hw_copies = 2
inversion_steps = 2

[[defenses]]
name = "gaussian_shading"
label = "gs-read2"
hw_copies = 2
{read}

[[image_attacks]]
name = "none"
"""

VERIFIER = {"gaussian_shading": {"inversion", "inversion_steps", "fixed_point_iters", "decoder_inversion_steps",
                                 "decoder_inversion_lr"},
            "tree_ring": {"score", "inversion", "inversion_steps", "fixed_point_iters", "decoder_inversion_steps",
                          "decoder_inversion_lr"}}


def _plan(tmp_path, read):
    return build_plan(load_config(write_config(tmp_path, GS_TOML, read=read), {}))


def _stages(plan, kind):
    return [s for s in plan.stages.values() if s.kind == kind]


def test_entries_differing_only_in_verifier_params_share_one_embed_and_one_generate_and_detect_apart(tmp_path):
    plan = _plan(tmp_path, 'inversion_steps = 3\ninversion = "exact"\ndecoder_inversion_steps = 5')
    assert len(_stages(plan, "embed")) == 1
    marked = [s for s in _stages(plan, "generate") if s.plugin is not None]
    assert len(marked) == 1  # the defence's generation (the clean model's plain images are the other generate)
    first, second = plan.cells
    assert (first.embed, first.images, first.negatives) == (second.embed, second.images, second.negatives)
    assert first.detect_pos != second.detect_pos and first.detect_neg != second.detect_neg
    assert len(_stages(plan, "detect")) == 4  # positives and negatives, read two ways
    # the shared stages see the verifier parameters at their defaults, the detect stages as configured
    assert marked[0].plugin.param_dict["inversion_steps"] == 0
    reads = {plan.stages[c.detect_pos].plugin.param_dict["inversion_steps"] for c in plan.cells}
    assert reads == {2, 3}


def test_a_non_verifier_parameter_still_gives_its_own_embedding(tmp_path):
    plan = _plan(tmp_path, "inversion_steps = 2\nchannel_copies = 2")
    assert len(_stages(plan, "embed")) == 2
    assert len([s for s in _stages(plan, "generate") if s.plugin is not None]) == 2


def test_verifier_params_at_their_defaults_keep_the_embed_key_they_had(tmp_path):
    """An entry that sets verifier parameters is embedded under the key of the entry at their defaults: the key
    the embedding had before the parameters were verifier-only (so committed numbers reproduce)."""
    from markbench.cache import stable_hash

    plan = _plan(tmp_path, "inversion_steps = 7")
    (embed,) = _stages(plan, "embed")
    default_spec = next(c.defense for c in plan.cells if c.defense.param_dict["inversion_steps"] == 2)
    identity = default_spec.identity()
    identity["params"]["inversion_steps"] = 0  # the declared default
    assert embed.key == stable_hash({"kind": "embed", "inputs": list(embed.inputs), "plugin": identity,
                                     "seed": 0, "extra": dict(embed.extra)})


@pytest.mark.slow
def test_changing_a_verifier_param_recomputes_detection_only(tmp_path):
    one = GS_TOML.split("[[defenses]]\nname = \"gaussian_shading\"\nlabel")[0] + '[[image_attacks]]\nname = "none"\n'
    cfg = load_config(write_config(tmp_path, one, name="a.toml"), {})
    first = Runner(cfg).run()
    assert first.ok and first.stages_run.get("embed") == 1
    again = load_config(write_config(tmp_path, one.replace("inversion_steps = 2", "inversion_steps = 3"),
                                     name="b.toml"), {})
    summary = Runner(again).run()
    assert summary.ok and summary.stages_run == {"detect": 2}  # positives and negatives; no embed, no generate


def test_the_sampling_time_defences_declare_their_inversion_settings_verifier_only():
    for name, expected in VERIFIER.items():
        cls = defenses.get(name)
        assert {p.name for p in cls.params if p.verifier} == expected, name


def test_bench_ls_marks_exactly_the_verifier_params(capsys, monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "400")  # one table row per parameter line, unwrapped
    assert main(["ls", "defenses", "-v"]) == 0
    marked = re.findall(r"(\w+): \w+ = [^;]*; [^\u2502]*\[verifier only\]", capsys.readouterr().out)
    assert sorted(marked) == sorted(n for names in VERIFIER.values() for n in names)


def test_only_a_defence_may_declare_a_verifier_param():
    class Bad(ImageAttack):
        """Not a defence."""
        version = "1"
        params = (Param("level", "int", 1, verifier=True),)

        def apply(self, images, generator, ctx=None):
            return images

    with pytest.raises(PluginValidationError, match="verifier=True, which only a defence"):
        image_attacks.register("_verifier_on_an_attack")(Bad)

    # a defence may: the sampling-time defences above register with theirs
