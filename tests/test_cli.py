"""The CLI as a person meets it: one sentence, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from markbench.cli import main

from .conftest import MICRO_TOML, write_config


def _bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "markbench.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("text, needle", [
    ("[run\nx=1\n", "invalid TOML"),
    (MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "dwtdtcsvd"'), "did you mean 'dwtdctsvd'"),
    (MICRO_TOML.replace('builtin = "micro-sd"', 'path = "missing/folder"'), "no such folder"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, text, needle):
    path = write_config(tmp_path, text)
    out = _bench("run", "--config", str(path))
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and str(path) in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    path = write_config(tmp_path, "[run\n")
    out = _bench("--debug", "validate", str(path))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_validate_ok_and_set_override(micro_config, capsys):
    assert main(["validate", str(micro_config), "--set", "run.seeds=[0,1]"]) == 0
    assert "= 12 cells" in capsys.readouterr().out


def test_bad_override_and_unknown_only(micro_config, capsys):
    assert main(["validate", str(micro_config), "--set", "runs.x=1"]) == 2
    assert "expected SECTION.KEY" in capsys.readouterr().err
    assert main(["run", "--config", str(micro_config), "--only", "nothing-matches", "--dry-run"]) == 2
    assert "matches no cell" in capsys.readouterr().err


def test_ls_lists_parameters(capsys):
    assert main(["ls", "attacks"]) == 0
    out = capsys.readouterr().out
    assert "jpeg" in out and "quality" in out and "strength" in out


def test_help_has_examples():
    out = _bench("run", "--help")
    assert out.returncode == 0 and "examples:" in out.stdout and "--rerun-failed" in out.stdout


def test_export_csv_and_parquet_roundtrip(tmp_path, capsys):
    """Export writes the same rows the database holds (written here by hand, no model work)."""
    import pandas as pd

    from markbench.config import load_config
    from markbench.plan import build_plan
    from markbench.plugins import Measurement
    from markbench.store import ResultStore

    path = write_config(tmp_path)
    cfg = load_config(path)
    cell = build_plan(cfg).cells[0]
    store = ResultStore(cfg.output / "results.sqlite")
    store.start_run("r1", "test", str(path), {}, {"torch": "x"}, "abc")
    store.write_cell("r1", cell, "ok", [Measurement("tpr@1e-06", 0.5, 0.25, 0.75, 16),
                                        Measurement("bit_accuracy", 0.9, 0.8, 0.95, 16)],
                     n_images=16, negatives="attacked")
    store.close()
    for suffix in ("csv", "parquet"):
        out = tmp_path / f"r.{suffix}"
        assert main(["export", "--config", str(path), "--to", str(out)]) == 0
        df = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
        assert len(df) == 2 and set(df.metric) == {"tpr@1e-06", "bit_accuracy"}
        row = df[df.metric == "tpr@1e-06"].iloc[0]
        assert (row.value, row.low, row.high, row.n) == (0.5, 0.25, 0.75, 16)
        assert row.cell == cell.label and row.git_hash == "abc"
    assert main(["export", "--config", str(path), "--to", str(tmp_path / "r.xlsx")]) == 2


def test_old_schema_database_is_refused(tmp_path):
    import sqlite3

    from markbench.errors import UserError
    from markbench.store import ResultStore

    db = tmp_path / "results.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="schema version 1"):
        ResultStore(db)


def test_gpu_session_scripts_are_valid_bash():
    """benchmarks/gpu/*.sh run on a machine this suite never sees (a GPU): at least they must parse, and the session
    must run the GPU tests and both trainings it promises."""
    import shutil
    from pathlib import Path

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
    for script in ("prepare.sh", "session.sh"):
        proc = subprocess.run([bash, "-n", str(folder / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    text = (folder / "session.sh").read_text()
    for needed in ("tests/test_gpu.py", "experiments/stable_signature_extractor.py", "experiments/aqualora_ppft_bits.py"):
        assert needed in text


def test_a_zero_bit_run_under_the_default_primary_metric_exits_0_and_shows_its_empirical_tpr(tmp_path, capsys):
    """The default run.primary_metric (tpr@1e-06, accepted unchecked) is not computed for a zero-bit defence (it
    reports tpr@fpr<=k/N). `bench run` used to finish its cells and then exit 2 with an error about a --metric nobody
    passed; it now shows the empirical TPR with a note, and so do `bench show` and `bench leaderboard`. An explicit
    --metric that does not exist is still an error."""
    import json

    from .test_progress_text import TREE_RING_MICRO

    cfg = write_config(tmp_path, TREE_RING_MICRO)
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "showing 'tpr@fpr<=1/4'" in out and "tpr@fpr<=1/4: value" in out
    assert main(["show", "--config", str(cfg)]) == 0 and "showing 'tpr@fpr<=1/4'" in capsys.readouterr().out
    lb = tmp_path / "lb.json"
    assert main(["leaderboard", "--config", str(cfg), "-q", "--out-json", str(lb),
                 "--out-md", str(tmp_path / "lb.md")]) == 0
    assert json.loads(lb.read_text())["metric"] == "tpr@fpr<=1/4"
    assert main(["show", "--config", str(cfg), "--metric", "tpr@1e-06"]) == 2


def test_shown_metric_prefers_the_same_family_then_auc_then_bit_accuracy():
    from markbench.config import shown_metric

    assert shown_metric("tpr@1e-06", ["auc", "tpr@1e-06"]) == "tpr@1e-06"
    assert shown_metric("tpr@1e-06", ["auc", "fpr@fpr<=1/32", "tpr@fpr<=1/32"]) == "tpr@fpr<=1/32"
    assert shown_metric("tpr@1e-06", ["auc", "psnr"]) == "auc"
    assert shown_metric("tpr@1e-06", ["bit_accuracy", "psnr"]) == "bit_accuracy"
    assert shown_metric("tpr@1e-06", ["psnr"]) is None
