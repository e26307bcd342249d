from __future__ import annotations

from pathlib import Path

import pytest

from markbench.config import load_config, parse_override
from markbench.errors import ConfigError

from .conftest import MICRO_TOML, write_config


def _cfg(tmp_path, text=MICRO_TOML, **kw):
    return load_config(write_config(tmp_path, text), **kw)


def test_micro_config_loads_typed(micro_config):
    cfg = load_config(micro_config)
    assert cfg.run.num_images == 4 and cfg.run.target_fprs == [1e-6, 0.1]
    assert cfg.model.builtin == "micro-sd" and cfg.model.guidance_scale == 7.5  # default kept
    assert [d.name for d in cfg.defenses] == ["none", "dwtdctsvd"]
    # identity columns are inserted; the sweep expands into one column per value
    assert [a.label for a in cfg.image_attacks] == ["none", "jpeg(quality=90)", "jpeg(quality=50)"]
    assert [a.name for a in cfg.model_attacks] == ["none"]
    assert {m.name for m in cfg.metrics} >= {"tpr", "bit_accuracy"}


def test_sweep_product_of_two_lists(tmp_path):
    text = MICRO_TOML + '\n[[image_attacks]]\nname = "crop"\nscale = [0.5, 0.8]\nmode = ["center", "random"]\n'
    cfg = _cfg(tmp_path, text)
    crops = [a for a in cfg.image_attacks if a.name == "crop"]
    assert len(crops) == 4
    assert {(a.param_dict["scale"], a.param_dict["mode"]) for a in crops} == {
        (0.5, "center"), (0.5, "random"), (0.8, "center"), (0.8, "random")}


def test_list_typed_parameter_is_not_a_sweep(tmp_path):
    text = MICRO_TOML + '\n[[image_attacks]]\nname = "combination"\nmembers = ["jpeg", "gaussian_blur"]\n'
    cfg = _cfg(tmp_path, text)
    combos = [a for a in cfg.image_attacks if a.name == "combination"]
    assert len(combos) == 1 and combos[0].param_dict["members"] == ["jpeg", "gaussian_blur"]


def test_strength_maps_to_natural_parameter(tmp_path):
    text = MICRO_TOML + '\n[[image_attacks]]\nname = "gaussian_noise"\nstrength = [0.0, 1.0]\n'
    noise = [a for a in _cfg(tmp_path, text).image_attacks if a.name == "gaussian_noise"]
    assert [a.param_dict["std"] for a in noise] == pytest.approx([0.0, 0.1])
    assert noise[1].label == "gaussian_noise(strength=1)"


def test_cli_overrides_beat_the_file(micro_config):
    cfg = load_config(micro_config, {"run.num_images": 7, "model.num_inference_steps": 3})
    assert cfg.run.num_images == 7 and cfg.model.num_inference_steps == 3
    assert parse_override("run.seeds=[0, 1]") == ("run.seeds", [0, 1])
    assert parse_override("run.output=some/dir") == ("run.output", "some/dir")


def test_cli_overrides_reach_plugin_parameters_by_label_then_name(tmp_path):
    text = MICRO_TOML + '\n[[defenses]]\nname = "dwtdct"\nlabel = "dwt.a"\n' \
        '\n[[image_attacks]]\nname = "crop"\nscale = 0.5\n'
    cfg = _cfg(tmp_path, text, overrides={"defenses.dwt.a.bits": 16, "image_attacks.jpeg.quality": [70],
                                          "image_attacks.crop.scale": [0.6, 0.9]})
    by_label = {d.label: d for d in cfg.defenses}
    assert by_label["dwt.a"].param_dict["bits"] == 16  # a label with a dot in it
    assert by_label["dwtdctsvd"].param_dict["bits"] != 16  # other entries untouched
    assert [a.param_dict["quality"] for a in cfg.image_attacks if a.name == "jpeg"] == [70]
    assert [a.param_dict["scale"] for a in cfg.image_attacks if a.name == "crop"] == [0.6, 0.9]  # a sweep
    with pytest.raises(ConfigError, match="no defenses entry labelled or named 'hiden'; it has: dwt.a, dwtdctsvd"):
        _cfg(tmp_path, text, overrides={"defenses.hiden.bits": 8})
    with pytest.raises(ConfigError, match=r"bits.*\(with --set defenses.dwtdctsvd.bits='many'\)"):
        _cfg(tmp_path, text, overrides={"defenses.dwtdctsvd.bits": "many"})  # validated as in the file
    # a name reaches the unlabelled entries of that name only, when some are labelled
    both = text + '\n[[defenses]]\nname = "dwtdct"\n'
    cfg = _cfg(tmp_path, both, overrides={"defenses.dwtdct.bits": 24})
    bits = {d.label.split("(")[0]: d.param_dict["bits"] for d in cfg.defenses}
    assert bits["dwtdct"] == 24 and bits["dwt.a"] != 24
    # and every entry of that name when none is unlabelled
    assert [d.param_dict["bits"] for d in _cfg(tmp_path, text, overrides={"defenses.dwtdct.bits": 24}).defenses
            if d.name == "dwtdct"] == [24]
    with pytest.raises(ConfigError, match="cannot be overridden"):
        _cfg(tmp_path, text, overrides={"defenses.dwtdctsvd.name": "none"})


@pytest.mark.parametrize("text, expected", [
    ("[run]\nnum_images = \n", ["invalid TOML", "line 2, column"]),
    (MICRO_TOML + "\n[runn]\nx=1\n", ["unknown section 'runn'", "did you mean 'run'"]),
    (MICRO_TOML.replace("num_images = 4", "num_imgs = 4"), ["run.num_imgs", "did you mean 'num_images'"]),
    (MICRO_TOML.replace("num_images = 4", 'num_images = "four"'), ["run.num_images = 'four'", "an integer"]),
    (MICRO_TOML.replace("num_images = 4", "num_images = 0"), ["run.num_images = 0", "an integer in [1,"]),
    (MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "dwtdctsvdd"'),
     ["defenses[1].name", "unknown defense 'dwtdctsvdd'", "did you mean 'dwtdctsvd'", "available:"]),
    (MICRO_TOML.replace("quality = [90, 50]", "quality = [90, 150]"),
     ["image_attacks[0].quality = 150", "'jpeg'", "an integer in [1, 100]"]),
    (MICRO_TOML.replace("quality = [90, 50]", 'quality = "high"'), ["quality = 'high'", "an integer"]),
    (MICRO_TOML.replace("quality = [90, 50]", "qualty = 50"), ["has no parameter 'qualty'", "did you mean 'quality'"]),
    (MICRO_TOML.replace("quality = [90, 50]", "quality = 50\nstrength = 0.5"), ["either 'strength' or"]),
    (MICRO_TOML.replace('builtin = "micro-sd"', 'path = "/nonexistent/sd15"'), ["model.path", "no such folder"]),
    (MICRO_TOML.replace('builtin = "micro-sd"', 'builtin = "micro-sd"\nhub_id = "a/b"'), ["exactly one of"]),
    (MICRO_TOML.replace("height = 64", "height = 60"), ["model.height = 60", "multiple of 8"]),
    (MICRO_TOML.replace("target_fprs = [1e-6, 0.1]", "target_fprs = [0, 0.1]"), ["run.target_fprs", "(0, 1)"]),
    (MICRO_TOML.replace('set = "micro:shapes"', 'builtin = "mikro"'), ["prompts.builtin", "did you mean 'micro'"]),
    (MICRO_TOML.replace('set = "micro:shapes"', 'set = "micro:shapez"'), ["prompts.set", "did you mean 'shapes'"]),
])
def test_bad_input_is_one_clear_sentence(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, text)
    msg = str(e.value)
    assert str(tmp_path / "bench.toml") in msg, msg  # names the file
    for piece in expected:
        assert piece in msg, msg
    assert "\n" not in msg


def test_unwritable_output_refused(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"run.output = .*not writable.*not a folder"):
        _cfg(tmp_path, MICRO_TOML, overrides={"run.output": str(blocker / "out")})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_shipped_config_is_valid():
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "bench.toml", check_output=False)
    assert cfg.defenses and cfg.image_attacks


def test_short_labels_from_config(tmp_path):
    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "dwtdctsvd"\nlabel = "svd"').replace(
        'quality = [90, 50]', 'quality = [90, 50]\nlabel = "jpg"')
    cfg = _cfg(tmp_path, text)
    assert [d.label for d in cfg.defenses] == ["none", "svd"]
    assert [a.label for a in cfg.image_attacks] == ["none", "jpg(quality=90)", "jpg(quality=50)"]
    with pytest.raises(ConfigError, match="label"):
        _cfg(tmp_path, MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "dwtdctsvd"\nlabel = "a b/c"'))


def test_plugin_entry_borrowed_from_another_config(tmp_path):
    other = tmp_path / "sub" / "other.toml"
    other.parent.mkdir()
    other.write_text('[[image_attacks]]\nname = "jpeg"\nquality = 33\n\n[[defenses]]\nname = "dwtdctsvd"\n')
    text = MICRO_TOML.replace('quality = [90, 50]', 'from = "sub/other.toml"')
    cfg = _cfg(tmp_path, text)
    assert [a.label for a in cfg.image_attacks] == ["none", "jpeg(quality=33)"]
    # keys beside 'from' override the borrowed ones
    cfg = _cfg(tmp_path, text.replace('from = "sub/other.toml"', 'from = "sub/other.toml"\nquality = 44'))
    assert cfg.image_attacks[1].param_dict["quality"] == 44
    with pytest.raises(ConfigError, match=r"image_attacks\[0\]\.from = 'nope.toml': no such file"):
        _cfg(tmp_path, MICRO_TOML.replace('quality = [90, 50]', 'from = "nope.toml"'))
    other.write_text('[[defenses]]\nname = "none"\n')
    with pytest.raises(ConfigError, match="0 \\[\\[image_attacks\\]\\] entries named 'jpeg'"):
        _cfg(tmp_path, text)


def test_labels_name_the_plugin_and_only_varying_or_few_changed_parameters(tmp_path):
    """A row label is the plugin's name plus the parameters that vary in the grid (or, for a lone entry, its few
    non-default ones); the full parameters stay in the store."""
    import glob

    from markbench.plan import build_plan

    root = Path(__file__).resolve().parent.parent
    longest = 0
    for path in [root / "bench.toml", *sorted(glob.glob(str(root / "configs" / "*.toml")))]:
        cfg = load_config(path, {"run.output": str(tmp_path / "o")}, check_output=False)
        longest = max(longest, *(len(c.label) for c in build_plan(cfg).cells))
        if Path(path).name == "sleepermark-finetune.toml":
            assert {d.label for d in cfg.defenses} == {"none", "sleepermark"}  # dozens of tiny-world settings, one name
    assert longest <= 100  # was over 600 for a SleeperMark row
    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "dwtdctsvd"\nbits = 32') + \
        '\n[[image_attacks]]\nname = "gaussian_noise"\nstd = 0.1\n'
    cfg = _cfg(tmp_path, text)
    assert [d.label for d in cfg.defenses] == ["none", "dwtdctsvd(bits=32)"]  # a lone entry: its one change
    assert [a.label for a in cfg.image_attacks] == ["none", "jpeg(quality=90)", "jpeg(quality=50)",
                                                    "gaussian_noise(std=0.1)"]
    assert dict(cfg.defenses[1].params)["bits"] == 32 and len(cfg.defenses[1].params) > 1  # all kept


def _with(metrics: str, primary: str, fprs: str = "[1e-6, 1e-4]") -> str:
    text = MICRO_TOML.replace('metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]',
                              f"metrics = {metrics}")
    text = text.replace("target_fprs = [1e-6, 0.1]", f"target_fprs = {fprs}", 1)
    return text.replace("batch_size = 4", f'batch_size = 4\nprimary_metric = "{primary}"', 1)


@pytest.mark.parametrize("metrics", ['["tpr", "keyless"]', '["tpr", "attacker_utility"]'])
def test_primary_metric_is_checked_with_every_builtin_metric_and_an_fpr_spelling_gets_its_name(tmp_path, metrics):
    """keyless and attacker_utility declare their outputs, so a misnamed primary metric is refused before the run
    (before: with either listed, 'tpr@1e-04' passed validation and failed after the whole grid)."""
    with pytest.raises(ConfigError, match=r"run.primary_metric = 'tpr@1e-04'.*did you mean 'tpr@0.0001'"):
        load_config(write_config(tmp_path, _with(metrics, "tpr@1e-04")))
    assert load_config(write_config(tmp_path, _with(metrics, "tpr@0.0001"))).run.primary_metric == "tpr@0.0001"
    # a zero-bit defence's empirical operating point is named by the negatives it has, known only at run time
    assert load_config(write_config(tmp_path, _with(metrics, "tpr@fpr<=1/32"))).run.primary_metric == "tpr@fpr<=1/32"
    with pytest.raises(ConfigError, match="run.primary_metric = 'keyless_auc_typo'"):
        load_config(write_config(tmp_path, _with(metrics, "keyless_auc_typo")))


def test_an_analytic_primary_metric_is_refused_when_every_defence_is_zero_bit(tmp_path):
    """tree_ring (a score defence) reports tpr@fpr<=k/N, never the analytic tpr@0.01: with only it (and the control)
    in the grid, 'tpr@0.01' would leave every leaderboard row empty after the whole run (configs/tree-ring-sd.toml
    had exactly this)."""
    zero_bit = _with('["tpr", "auc"]', "tpr@0.01", "[0.01]").replace('name = "dwtdctsvd"', 'name = "tree_ring"')
    with pytest.raises(ConfigError, match=r"run.primary_metric = 'tpr@0.01' is an analytic operating point.*"
                                          r"tree_ring.*'auc'"):
        load_config(write_config(tmp_path, zero_bit))
    assert load_config(write_config(tmp_path, zero_bit.replace('"tpr@0.01"', '"auc"'))).run.primary_metric == "auc"
    # beside a multi-bit defence the analytic point exists (for that defence's rows): accepted
    mixed = _with('["tpr", "auc"]', "tpr@0.01", "[0.01]")
    assert load_config(write_config(tmp_path, mixed)).run.primary_metric == "tpr@0.01"
    # not written in the file: the default (tpr@1e-06) ranks what it can, and is no error
    default = _with('["tpr", "auc"]', "x", "[1e-6, 0.01]").replace('name = "dwtdctsvd"', 'name = "tree_ring"')
    default = default.replace('primary_metric = "x"\n', "")
    assert load_config(write_config(tmp_path, default)).run.primary_metric == "tpr@1e-06"
