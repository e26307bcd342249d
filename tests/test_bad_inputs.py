"""A corpus of bad inputs: each is refused by `bench validate` and by `bench run` (before any model loads) with exit
code 2 and one line on stderr that names the key, no traceback, of sane length."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from markbench.cli import main

from .conftest import MICRO_TOML, write_config


def _set(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _model_folder(tmp: Path) -> Path:
    """A copy of the built-in micro-sd pipeline folder (safetensors weights), to damage."""
    from markbench.models import builtin_folder

    dest = tmp / "sd"
    shutil.copytree(builtin_folder("micro-sd"), dest)
    return dest


def _with_model_path(tmp: Path, folder: Path) -> str:
    return _set(MICRO_TOML, 'builtin = "micro-sd"', f'path = "{folder}"')


def _folder_damage(what: str):
    def make(tmp: Path) -> str:
        folder = _model_folder(tmp)
        if what == "index_not_json":
            (folder / "model_index.json").write_text('{"unet": ["diffusers", ')
        elif what == "index_not_object":
            (folder / "model_index.json").write_text("[1, 2, 3]")
        elif what == "component_missing":
            shutil.rmtree(folder / "vae")
        elif what == "no_weights":
            (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        elif what == "component_wrong_type":
            index = json.loads((folder / "model_index.json").read_text())
            index["unet"] = 5
            (folder / "model_index.json").write_text(json.dumps(index))
        elif what == "no_class_name":
            index = json.loads((folder / "model_index.json").read_text())
            del index["_class_name"]
            (folder / "model_index.json").write_text(json.dumps(index))
        elif what == "component_config_not_json":
            (folder / "unet" / "config.json").write_text('{"in_channels": ')
        elif what == "component_config_missing":
            (folder / "unet" / "config.json").unlink()
        elif what in ("weights_truncated", "weights_garbage", "weights_empty"):
            w = folder / "unet" / "diffusion_pytorch_model.safetensors"
            w.write_bytes({"weights_truncated": w.read_bytes()[:-100], "weights_garbage": os.urandom(4000),
                           "weights_empty": b""}[what])
        elif what == "unknown_class":  # a misspelt class: caught from the library's table, nothing loaded
            index = json.loads((folder / "model_index.json").read_text())
            index["unet"] = ["diffusers", "UNet2DConditionModl"]
            (folder / "model_index.json").write_text(json.dumps(index))
        elif what == "pickle_only":
            (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
            (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
        return _with_model_path(tmp, folder)
    return make


def _prompts_file(content: bytes | None, folder: bool = False):
    def make(tmp: Path) -> str:
        f = tmp / "prompts.txt"
        if folder:
            f.mkdir()
        else:
            f.write_bytes(content)
        return _set(MICRO_TOML, 'set = "micro:shapes"', f'file = "{f}"')
    return make


def _prompts_fifo(tmp: Path) -> str:
    f = tmp / "prompts.txt"
    os.mkfifo(f)  # reading it would block for ever: it must be refused without being opened
    return _set(MICRO_TOML, 'set = "micro:shapes"', f'file = "{f}"')


def _results_db_folder(tmp: Path) -> str:
    (tmp / "out" / "results.sqlite").mkdir(parents=True)
    return MICRO_TOML


def _foreign_database(tmp: Path) -> str:
    """Another program's SQLite database where the results database goes: refused, and never written into."""
    import sqlite3

    (tmp / "out").mkdir(parents=True)
    con = sqlite3.connect(tmp / "out" / "results.sqlite")
    con.execute("CREATE TABLE results (x)")
    con.commit()
    con.close()
    return MICRO_TOML


def _symlink_loop(tmp: Path, name: str) -> Path:
    link = tmp / name
    link.symlink_to(link)
    return link


def _run_as_value(t: str) -> str:
    """``run = 5``: a section given as a value."""
    return "run = 5\n" + t.split("[run]")[0] + "[model]" + t.split("[model]", 1)[1]


def _a_file(tmp: Path) -> Path:
    f = tmp / "afile"
    f.write_text("x")
    return f


def _old_database(tmp: Path) -> str:
    import sqlite3

    (tmp / "out").mkdir()
    con = sqlite3.connect(tmp / "out" / "results.sqlite")
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.commit()
    con.close()
    return MICRO_TOML


def _text(transform):
    return lambda tmp: transform(MICRO_TOML)


#: (id, config text maker, extra CLI args, what the message must name)
CONFIGS = [
    ("binary_prompts_file", _prompts_file(os.urandom(64) + b"\xff\xfe"), [], "prompts.file"),
    ("nul_bytes_prompts_file", _prompts_file(b"a red circle\x00\x00\n"), [], "prompts.file"),
    ("prompts_file_is_folder", _prompts_file(None, folder=True), [], "prompts.file"),
    ("empty_prompts_file", _prompts_file(b"# nothing\n\n"), [], "prompts.file"),
    ("duplicate_labels", _text(lambda t: t + '\n[[defenses]]\nname = "dwtdct"\nlabel = "mark"\n'
                               '[[defenses]]\nname = "dwtdctsvd"\nbits = 32\nlabel = "mark"\n'), [], "label"),
    ("run_is_a_value_with_set", _text(_run_as_value), ["--set", "run.num_images=8"], "'run'"),
    ("run_is_a_value_with_output", _text(_run_as_value), ["--output", "/tmp/x"], "'run'"),
    ("run_is_a_value", _text(_run_as_value), [], "'run'"),
    ("unknown_primary_metric", _text(lambda t: _set(t, "batch_size = 4", 'batch_size = 4\nprimary_metric = "tpr@0.5"')),
     [], "run.primary_metric"),
    ("primary_metric_of_absent_metric",
     _text(lambda t: _set(t, "batch_size = 4", 'batch_size = 4\nprimary_metric = "fid"')),
     [], "run.primary_metric"),
    ("model_index_not_json", _folder_damage("index_not_json"), [], "model_index.json"),
    ("model_index_not_object", _folder_damage("index_not_object"), [], "model_index.json"),
    ("model_component_missing", _folder_damage("component_missing"), [], "vae"),
    ("model_without_weights", _folder_damage("no_weights"), [], "unet"),
    ("model_pickle_only", _folder_damage("pickle_only"), [], "model.allow_pickle"),
    ("model_path_is_file", lambda tmp: _set(MICRO_TOML, 'builtin = "micro-sd"', f'path = "{_a_file(tmp)}"'), [],
     "model.path"),
    ("hub_id_not_cached_offline", _text(lambda t: _set(t, 'builtin = "micro-sd"', 'hub_id = "nobody/no-such-model"')),
     [], "model.hub_id"),
    ("cache_uncreatable", _text(lambda t: _set(t, "seeds = [0]", 'seeds = [0]\ncache = "/proc/self/nope/cache"')),
     [], "run.cache"),
    ("cache_under_a_file", lambda tmp: _set(MICRO_TOML, "seeds = [0]", f'seeds = [0]\ncache = "{_a_file(tmp)}/c"'),
     [], "run.cache"),
    ("output_is_a_file", lambda tmp: _set(MICRO_TOML, 'output = "{output}"', f'output = "{_a_file(tmp)}"'), [],
     "run.output"),
    ("num_images_absurd", _text(lambda t: _set(t, "num_images = 4", "num_images = 1000000000000")), [],
     "run.num_images"),
    ("num_images_zero", _text(lambda t: _set(t, "num_images = 4", "num_images = 0")), [], "run.num_images"),
    ("batch_size_absurd", _text(lambda t: _set(t, "batch_size = 4", "batch_size = 1000000000")), [], "run.batch_size"),
    ("seeds_empty", _text(lambda t: _set(t, "seeds = [0]", "seeds = []")), [], "run.seeds"),
    ("seeds_duplicate", _text(lambda t: _set(t, "seeds = [0]", "seeds = [1, 1]")), [], "run.seeds"),
    ("seeds_too_many", _text(lambda t: _set(t, "seeds = [0]", f"seeds = {list(range(5000))}")), [], "run.seeds"),
    ("seed_negative", _text(lambda t: _set(t, "seeds = [0]", "seeds = [-3]")), [], "run.seeds"),
    ("height_absurd", _text(lambda t: _set(t, "height = 64", "height = 1000000")), [], "model.height"),
    ("steps_zero", _text(lambda t: _set(t, "num_inference_steps = 2", "num_inference_steps = 0")), [],
     "model.num_inference_steps"),
    ("dtype_unknown", _text(lambda t: _set(t, "height = 64", 'height = 64\ndtype = "float64"')), [], "model.dtype"),
    ("device_unknown", _text(lambda t: _set(t, "batch_size = 4", 'batch_size = 4\ndevice = "tpu"')), [], "run.device"),
    ("fpr_out_of_range", _text(lambda t: _set(t, "target_fprs = [1e-6, 0.1]", "target_fprs = [2]")), [],
     "run.target_fprs"),
    ("huge_plugin_name", _text(lambda t: t + '\n[[defenses]]\nname = "' + "x" * 1_000_000 + '"\n'), [], "name"),
    ("huge_param_value", _text(lambda t: _set(t, "quality = [90, 50]", 'quality = "' + "q" * 1_000_000 + '"')), [],
     "quality"),
    ("huge_unknown_key", _text(lambda t: _set(t, "seeds = [0]", "seeds = [0]\n" + "k" * 1_000_000 + " = 1")), [],
     "run."),
    ("huge_section_name", _text(lambda t: t + "\n[" + "s" * 1_000_000 + "]\n"), [], "unknown section"),
    ("unknown_defence", _text(lambda t: _set(t, 'name = "dwtdctsvd"', 'name = "dwtdctsvdd"')), [], "defenses[1].name"),
    ("unknown_metric", _text(lambda t: _set(t, '"ssim"]', '"ssim", "sharpness"]')), [], "metrics[6].name"),
    ("defenses_not_a_list", _text(lambda t: 'defenses = "dwtdct"\n' + t.replace('[[defenses]]\nname = "none"\n', "")
                                  .replace('[[defenses]]\nname = "dwtdctsvd"\n', "")), [], "defenses"),
    ("label_bad_characters", _text(lambda t: _set(t, 'name = "dwtdctsvd"', 'name = "dwtdctsvd"\nlabel = "a b/c"')), [],
     "label"),
    ("param_out_of_range", _text(lambda t: _set(t, "quality = [90, 50]", "quality = [90, 150]")), [], "quality"),
    ("unknown_param", _text(lambda t: _set(t, "quality = [90, 50]", "qualty = 50")), [], "qualty"),
    ("empty_sweep", _text(lambda t: _set(t, "quality = [90, 50]", "quality = []")), [], "quality"),
    ("from_missing_file", _text(lambda t: _set(t, 'name = "dwtdctsvd"', 'name = "dwtdctsvd"\nfrom = "nope.toml"')), [],
     ".from"),
    ("empty_prompt_in_list", _text(lambda t: _set(t, 'set = "micro:shapes"', 'list = ["a red circle", "  "]')), [],
     "prompts.list"),
    ("invalid_toml", _text(lambda t: t + "\n[run\n"), [], "invalid TOML"),
    ("fid_reference_missing",
     _text(lambda t: _set(t, '"ssim"]', '"ssim", {name = "fid", reference = "/no/such/dir"}]')),
     [], "reference"),
    ("old_results_database", _old_database, [], "schema version"),
    ("guidance_nan", _text(lambda t: _set(t, "height = 64", "height = 64\nguidance_scale = nan")), [],
     "model.guidance_scale"),
    ("guidance_huge", _text(lambda t: _set(t, "height = 64", "height = 64\nguidance_scale = 1e308")), [],
     "model.guidance_scale"),
    ("prompt_megabyte_long_in_list", _text(lambda t: _set(t, 'set = "micro:shapes"', 'list = ["' + "a" * 1_000_000
                                                                                          + '"]')), [], "prompts.list"),
    ("prompt_megabyte_long_in_file", _prompts_file(b"a red circle\n" + b"a" * 1_000_000 + b"\n"), [], "prompts.file"),
    ("prompts_list_explicitly_empty", _text(lambda t: _set(t, 'set = "micro:shapes"', "list = []")), [],
     "prompts.list"),
    ("prompts_file_is_a_fifo", _prompts_fifo, [], "not a regular file"),
    ("label_empty", _text(lambda t: _set(t, 'name = "dwtdctsvd"', 'name = "dwtdctsvd"\nlabel = ""')), [], "label"),
    ("label_huge", _text(lambda t: _set(t, 'name = "dwtdctsvd"', 'name = "dwtdctsvd"\nlabel = "' + "l" * 1_000_000
                                        + '"')), [], "label"),
    ("plugin_name_not_a_string", _text(lambda t: t + "\n[[defenses]]\nname = 5\n"), [], "defenses[2].name = 5"),
    ("results_database_is_a_folder", _results_db_folder, [], "results.sqlite"),
    ("output_symlink_loop", lambda tmp: _set(MICRO_TOML, 'output = "{output}"',
                                             f'output = "{_symlink_loop(tmp, "loop")}"'), [], "symbolic link"),
    ("cache_symlink_loop", lambda tmp: _set(MICRO_TOML, "seeds = [0]",
                                            f'seeds = [0]\ncache = "{_symlink_loop(tmp, "loop")}"'), [],
     "symbolic link"),
    ("model_index_component_not_a_pair", _folder_damage("component_wrong_type"), [], "[library, class]"),
    ("model_index_without_class_name", _folder_damage("no_class_name"), [], "_class_name"),
    ("model_component_config_not_json", _folder_damage("component_config_not_json"), [],
     "unet/config.json cannot be loaded"),
    ("model_component_config_missing", _folder_damage("component_config_missing"), [], "config.json"),
    ("model_weights_truncated", _folder_damage("weights_truncated"), [], "safetensors"),
    ("model_weights_garbage", _folder_damage("weights_garbage"), [], "safetensors"),
    ("model_weights_empty", _folder_damage("weights_empty"), [], "safetensors"),
    ("output_option_empty", _text(lambda t: t), ["--output", ""], "run.output"),
    ("resources_nan", _text(lambda t: t + "\n[resources]\ngenerate = {num_cpus = nan}\n"), [],
     "resources.generate.num_cpus"),
    ("resources_infinite", _text(lambda t: t + "\n[resources]\ngenerate = {memory = inf}\n"), [],
     "resources.generate.memory"),
    ("resources_not_a_table", _text(lambda t: "resources = 5\n" + t), [], "'resources' must be a table"),
    ("resources_huge_key", _text(lambda t: t + "\n[resources]\n" + "g" * 1_000_000 + " = {num_cpus = 1}\n"), [],
     "unknown stage kind"),
    ("not_utf8_config", None, [], "UTF-8"),
    ("negative_prompt_megabyte_long",
     _text(lambda t: _set(t, "height = 64", 'height = 64\nnegative_prompt = "' + "n" * 1_000_000 + '"')), [],
     "model.negative_prompt"),
    ("foreign_results_database", _foreign_database, [], "not a MarkBench results database"),
    ("model_component_unknown_class", _folder_damage("unknown_class"), [], "names no class of diffusers"),
    ("set_without_equals", _text(lambda t: t), ["--set", "run.num_images"], "--set"),
    ("set_bad_value", _text(lambda t: t), ["--set", "run.num_images=-1"], "run.num_images"),
    ("set_unknown_section", _text(lambda t: t), ["--set", "runn.seeds=[1]"], "--set runn.seeds"),
    ("set_unknown_plugin_label", _text(lambda t: t), ["--set", "defenses.nosuch.bits=3"], "defenses.nosuch.bits"),
]


def _write(tmp_path: Path, case_id: str, make) -> Path:
    if case_id == "not_utf8_config":
        p = tmp_path / "bench.toml"
        p.write_bytes(b"[run]\nname = \"\xff\xfe\"\n")
        return p
    text = make(tmp_path)
    p = tmp_path / "bench.toml"
    p.write_text(text.replace("{output}", str(tmp_path / "out")))
    return p


def _assert_one_sentence(capsys, rc: int, needle: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, err[:500])
    assert "Traceback" not in err + captured.out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith("error: ") and len(lines[0]) < 1200, lines[0][:300]
    assert needle in lines[0], lines[0][:1200]
    return lines[0]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case_id, make, extra, needle", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_is_one_sentence_exit_2_before_any_work(tmp_path, capsys, monkeypatch, command, case_id, make,
                                                           extra, needle):
    import markbench.modelcheck

    def no_load(cfg):  # a run must refuse these before any model loads
        raise AssertionError("a model was loaded for a bad input")

    monkeypatch.setattr(markbench.modelcheck, "load_base", no_load)
    path = _write(tmp_path, case_id, make)
    capsys.readouterr()  # what building a test model printed
    argv = [command, str(path)] if command == "validate" else [command, "--config", str(path), "--no-progress"]
    rc = main(argv + extra)
    _assert_one_sentence(capsys, rc, needle)
    if case_id == "foreign_results_database":  # refused and left exactly as it was
        import sqlite3

        con = sqlite3.connect(tmp_path / "out" / "results.sqlite")
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["results"]
        con.close()
    elif case_id not in ("old_results_database", "results_database_is_a_folder"):
        assert not (tmp_path / "out" / "results.sqlite").exists()


#: bad command lines (no config problem)
COMMANDS = [
    ("config_is_a_folder", lambda tmp: ["validate", str(tmp)], "is a folder"),
    ("config_missing", lambda tmp: ["run", "--config", str(tmp / "nope.toml")], "not found"),
    ("only_matches_nothing", lambda tmp: ["run", "--config", str(write_config(tmp)), "--only", "zzz*"], "--only"),
    ("prune_without_criterion", lambda tmp: ["cache", "prune", "--cache", str(tmp)], "--older-than"),
    ("prune_bad_age", lambda tmp: ["cache", "prune", "--cache", str(tmp), "--older-than", "banana"], "--older-than"),
    ("cache_is_a_file", lambda tmp: ["cache", "du", "--cache", str(_a_file(tmp))], "--cache"),
    ("config_is_a_fifo", lambda tmp: ["validate", str(_fifo(tmp / "f.toml"))], "not a regular file"),
    ("config_is_a_device", lambda tmp: ["run", "--config", "/dev/zero"], "not a regular file"),
    ("config_symlink_loop", lambda tmp: ["validate", str(_symlink_loop(tmp, "loop.toml"))], "symbolic link"),
    ("config_too_big", lambda tmp: ["validate", str(_sparse(tmp / "big.toml", 17 * 2 ** 20))], "at most"),
    ("unknown_subcommand", lambda tmp: ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("unknown_option", lambda tmp: ["run", "--frob"], "unrecognized arguments: --frob"),
    ("unknown_cache_subcommand", lambda tmp: ["cache", "frob"], "invalid choice: 'frob'"),
    ("unknown_ls_kind", lambda tmp: ["ls", "nope"], "invalid choice: 'nope'"),
    ("option_without_its_value", lambda tmp: ["cache", "prune", "--older-than"], "expected one argument"),
    ("named_cache_folder_missing", lambda tmp: ["cache", "du", "--cache", str(tmp / "nope")], "no such folder"),
    ("show_without_results", lambda tmp: ["show", "--config", str(write_config(tmp))], "no results yet"),
    ("export_without_results", lambda tmp: ["export", "--config", str(write_config(tmp)), "--to", str(tmp / "x.xls")],
     "no results yet"),
]


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


@pytest.mark.parametrize("case_id, argv, needle", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_bad_command_line_is_one_sentence_exit_2(tmp_path, capsys, case_id, argv, needle):
    rc = main(argv(tmp_path))
    _assert_one_sentence(capsys, rc, needle)


def test_echoed_values_are_cut(tmp_path, capsys):
    path = _write(tmp_path, "huge_plugin_name", CONFIGS[[c[0] for c in CONFIGS].index("huge_plugin_name")][1])
    line = _assert_one_sentence(capsys, main(["validate", str(path)]), "defenses[2].name")
    assert len(line) < 400 and "1000002 characters" in line


def test_model_that_cannot_load_is_one_user_error_before_any_cell(tmp_path, capsys):
    """A folder that passes the file checks but does not load (a broken unet config): one sentence, exit 2, no cell
    stored as failed (the model is the user's input, not a defence's fault)."""
    folder = _model_folder(tmp_path)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [7]
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    path = _write(tmp_path, "x", lambda tmp: _with_model_path(tmp, folder))
    capsys.readouterr()
    rc = main(["run", "--config", str(path), "--no-progress"])
    line = _assert_one_sentence(capsys, rc, "model.path")
    assert "could not be loaded" in line
    import sqlite3

    con = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    assert con.execute("select count(*) from cells").fetchone()[0] == 0
    con.close()


def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """run.device = 'cuda' (or 'cuda:7') where there is no such device: one sentence naming the device and the way
    out, before any model loads; `validate --no-model` (a GPU config checked on a CPU box) still passes."""
    import torch

    import markbench.modelcheck

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: cuda and cuda:0 are fine, cuda:1 is not
    monkeypatch.setattr(markbench.modelcheck, "load_base", lambda cfg: pytest.fail("a model was loaded"))
    path = write_config(tmp_path, MICRO_TOML.replace("batch_size = 4", 'batch_size = 4\ndevice = "cuda:1"'))
    capsys.readouterr()
    line = _assert_one_sentence(capsys, main(["run", "--config", str(path), "--no-progress"]), "run.device")
    assert "'cuda:1' is not available here (1 CUDA device(s), cuda:0 to cuda:0)" in line
    _assert_one_sentence(capsys, main(["validate", str(path)]), "run.device")
    assert main(["validate", str(path), "--no-model"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        path = write_config(tmp_path, MICRO_TOML.replace("batch_size = 4", f'batch_size = 4\ndevice = "{device}"'))
        line = _assert_one_sentence(capsys, main(["validate", str(path)]), "run.device")
        assert "no CUDA device" in line


def test_clearing_one_prompt_key_while_setting_another_is_fine(tmp_path, capsys):
    """Only keys that are all empty are refused: `--set prompts.set= --set prompts.list=[...]` switches sources."""
    path = write_config(tmp_path)
    rc = main(["validate", str(path), "--no-model", "--set", "prompts.set=", "--set", 'prompts.list=["a red circle"]'])
    assert rc == 0, capsys.readouterr().err


def test_irrelevant_files_in_a_model_folder_are_not_looked_at(tmp_path, capsys):
    """Only the files the loaders read are checked: a user's notes (a JSON list, a README) beside the weights leave
    a good model folder valid."""
    folder = _model_folder(tmp_path)
    (folder / "unet" / "notes.json").write_text("[1, 2]")
    (folder / "README.md").write_text("my model")
    (folder / "vae" / "garbage.bin.txt").write_bytes(os.urandom(100))
    path = _write(tmp_path, "x", lambda tmp: _with_model_path(tmp, folder))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
