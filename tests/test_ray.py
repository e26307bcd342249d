"""The Ray executor (``bench run --executor ray``): the same numbers as in-process, cell by cell; a worker lost
mid-stage is retried; stages are placed by their resources on a two-node cluster; no Ray is one sentence, exit 2.

Ray writes under the home folder and its temporary folder: both point into pytest's temporary folder here, Ray is
started with 2 CPUs at most and always shut down.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from markbench.cli import main
from markbench.config import load_config
from markbench.runner import Runner

from . import plugins_for_tests  # noqa: F401  (registers the _test plugins; Ray workers import it by name)
from .conftest import MICRO_TOML, write_config

CRASH = '\n[[image_attacks]]\nname = "_test_crash"\n'


@contextmanager
def _ray_home(tmp: Path):
    """HOME and RAY_TMPDIR inside ``tmp`` while Ray runs (Ray keeps a token and sessions there).

    Every ``RAY_*`` variable is put back afterwards too: ``ray.init`` sets ``RAY_AUTH_MODE=token`` in the driver's
    environment, and a later cluster started by the same process would then look for a token in a HOME that is gone
    (its GCS never comes up: the two-node test failed that way after this module's local Ray).
    """
    saved = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    saved.update({k: os.environ.get(k) for k in ("HOME", "RAY_TMPDIR")})
    (tmp / "home").mkdir(exist_ok=True)
    (tmp / "ray").mkdir(exist_ok=True)  # where Ray records the address of the cluster it started
    os.environ["HOME"] = str(tmp / "home")
    os.environ["RAY_TMPDIR"] = str(tmp)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("RAY_") and k not in saved]:
            del os.environ[k]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray = pytest.importorskip("ray")
    tmp = Path("/tmp") / f"mb-ray-{os.getpid()}"  # short: Ray's socket paths must stay under 107 characters
    tmp.mkdir(exist_ok=True)
    with _ray_home(tmp):
        ray.init(num_cpus=2, _temp_dir=str(tmp / "r"), include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def _rows(output: Path) -> dict[tuple[str, str], tuple]:
    con = sqlite3.connect(output / "results.sqlite")
    rows = {(cell, metric): rest for cell, metric, *rest in con.execute(
        "select cell, metric, value, low, high, n, note from results_full")}
    con.close()
    return rows


def _cells(output: Path) -> dict[str, tuple[str, str | None]]:
    con = sqlite3.connect(output / "results.sqlite")
    out = {label: (status, error) for label, status, error in con.execute("select label, status, error from cells")}
    con.close()
    return out


def _run(tmp: Path, text: str, executor: str, **kw):
    cfg = load_config(write_config(tmp, text, output=str(tmp / executor)), {"run.executor": executor})
    return cfg, Runner(cfg, **kw).run()


@pytest.mark.slow
def test_ray_run_gives_the_in_process_numbers_cell_by_cell_and_the_same_failures(local_ray, tmp_path):
    text = MICRO_TOML + CRASH
    cfg_local, local = _run(tmp_path, text, "local")
    cfg_ray, remote = _run(tmp_path, text, "ray")
    assert local.cells_total == remote.cells_total == 8
    assert remote.stages_run == local.stages_run and len(remote.cells_failed) == 2
    rows_local, rows_ray = _rows(cfg_local.output), _rows(cfg_ray.output)
    assert len(rows_local) > 50 and rows_ray == rows_local  # every metric of every cell, value, interval and N
    cells = _cells(cfg_ray.output)
    assert cells == _cells(cfg_local.output)
    assert {e for s, e in cells.values() if s == "failed"} == {
        "image_attack stage of '_test_crash' failed: RuntimeError: boom: this attack always fails"}
    # the stages ran on Ray workers (other processes), which record where in the stage's metadata
    metas = [json.loads(p.read_text()) for p in cfg_ray.cache_dir.glob("*/*/meta.json")]
    assert metas and all(m["node_id"] == local_ray.get_runtime_context().get_node_id() for m in metas)
    assert {m["worker_pid"] for m in metas}.isdisjoint({os.getpid()})


@pytest.mark.slow
def test_worker_killed_mid_stage_is_retried_and_numbers_are_unchanged(local_ray, tmp_path):
    marker = tmp_path / "killed-once"
    text = MICRO_TOML + f'\n[[image_attacks]]\nname = "_test_die"\nmarker = "{marker}"\n'
    cfg_ray, remote = _run(tmp_path, text, "ray")
    assert marker.exists()  # a worker did die in the middle of that stage
    assert remote.ok and remote.cells_ok == 8
    cfg_local, local = _run(tmp_path, text, "local")  # the marker exists now: in-process the attack just runs
    assert _rows(cfg_ray.output) == _rows(cfg_local.output)


def test_ray_executor_without_ray_is_one_sentence_exit_2(micro_config, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["run", "--config", str(micro_config), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run.executor = 'ray' needs the Python package 'ray'" in err
    assert "pip install 'markbench[ray]'" in err
    assert main(["run", "--config", str(micro_config), "--executor", "dask"]) == 2
    assert "run.executor = 'dask' is invalid" in capsys.readouterr().err


def test_resources_table_is_validated(tmp_path):
    from markbench.errors import ConfigError

    for table, message in (("render = {num_cpus = 1}", r"resources\.render: unknown stage kind 'render'"),
                           ("generate = {num_gpus = -1}", r"resources\.generate\.num_gpus = -1 is invalid"),
                           ('"image_attack:jpg" = {num_cpus = 2}', "no image_attacks entry is named or labelled 'jpg'")):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, MICRO_TOML + "\n[resources]\n" + _braces(table) + "\n"))


def test_stage_resources_layer_kind_then_plugin_then_config(tmp_path):
    from markbench.plan import build_plan
    from markbench.resources import stage_resources

    text = MICRO_TOML + '\n[[model_attacks]]\nname = "prune"\n' + \
        _braces('\n[resources]\ngenerate = {num_gpus = 0.5}\n"image_attack:jpeg" = {num_cpus = 2, memory = 1e9}\n')
    path = write_config(tmp_path, text)
    for device in ("cuda", "cpu"):
        cfg = load_config(path, {"run.device": device})
        by = {(s.kind, s.plugin.name if s.plugin else None): stage_resources(s, cfg)
              for s in build_plan(cfg).stages.values()}
        gpu = (lambda n: {"num_gpus": n}) if device == "cuda" else (lambda n: {})
        assert by[("generate", None)] == {"num_cpus": 1} | gpu(0.5)  # config over the kind's default GPU
        assert by[("embed", "dwtdctsvd")] == {"num_cpus": 1} | gpu(1)  # the kind's default
        assert by[("model_attack", "prune")] == {"num_cpus": 1}  # the plugin's class attribute: no GPU
        assert by[("image_attack", "jpeg")] == {"num_cpus": 2, "memory": 1e9}  # config, by plugin name
        assert by[("detect", "dwtdctsvd")] == {"num_cpus": 1}


def _braces(toml: str) -> str:
    """Inline tables survive write_config's str.format."""
    return toml.replace("{", "{{").replace("}", "}}")
