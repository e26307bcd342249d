"""The readers of a results database keep to the config's grid: the cells an earlier version of the config left in
the same output folder (an attack since renamed or dropped) are not mixed into `bench show`, `export`, `leaderboard`
or `report`, and `--all-cells` brings them back."""

from __future__ import annotations

import json

import pytest

from markbench.cli import main

from .conftest import MICRO_TOML, write_config

#: one defence under JPEG 90 and 50, few images and steps: the smallest real grid
SMALL = MICRO_TOML.replace('[[defenses]]\nname = "dwtdctsvd"\n', "").replace(
    'metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]', 'metrics = ["bit_accuracy", "tpr", "psnr"]')


def _labels(path) -> set[str]:
    doc = json.loads(path.read_text())
    return {f"{c['defense_label']}/{c['model_attack_label']}/{c['image_attack_label']}" for c in doc["cells"]}


@pytest.mark.slow  # two runs of a small grid: about 60 s on the shared CPU
def test_readers_keep_the_configs_grid_and_all_cells_brings_back_the_rest(tmp_path, capsys):
    old = write_config(tmp_path, SMALL, name="old.toml")
    assert main(["run", "--config", str(old), "--no-progress"]) == 0
    # the config changes: JPEG 50 is dropped, blur added; same output folder, same database
    new = write_config(tmp_path, SMALL.replace("quality = [90, 50]", "quality = [90]") + (
        '\n[[image_attacks]]\nname = "gaussian_blur"\nkernel_size = [3]\n'), name="new.toml")
    assert main(["run", "--config", str(new), "--no-progress"]) == 0
    capsys.readouterr()

    assert main(["leaderboard", "--config", str(new), "--out-json", str(tmp_path / "lb.json"),
                 "--out-md", str(tmp_path / "lb.md"), "-q"]) == 0
    grid = _labels(tmp_path / "lb.json")
    assert any("jpeg(quality=90)" in c for c in grid) and any("gaussian_blur" in c for c in grid)
    assert not any("quality=50" in c for c in grid)
    assert main(["leaderboard", "--config", str(new), "--out-json", str(tmp_path / "all.json"),
                 "--out-md", str(tmp_path / "all.md"), "-q", "--all-cells"]) == 0
    assert _labels(tmp_path / "all.json") - grid == {"none/none/jpeg(quality=50)"}

    assert main(["export", "--config", str(new), "--to", str(tmp_path / "grid.csv")]) == 0
    assert main(["export", "--config", str(new), "--to", str(tmp_path / "all.csv"), "--all-cells"]) == 0
    assert "quality=50" not in (tmp_path / "grid.csv").read_text()
    assert "quality=50" in (tmp_path / "all.csv").read_text()

    capsys.readouterr()
    assert main(["show", "--config", str(new), "--metric", "bit_accuracy", "--format", "csv"]) == 0
    shown = capsys.readouterr().out
    assert "gaussian_blur" in shown and "quality=50" not in shown

    assert main(["report", "--config", str(new), "--out", str(tmp_path / "r.html")]) == 0
    assert main(["report", "--config", str(new), "--out", str(tmp_path / "all.html"), "--all-cells"]) == 0
    assert "quality=50" not in (tmp_path / "r.html").read_text() and "quality=50" in (tmp_path / "all.html").read_text()


@pytest.mark.slow  # two small runs: about 30 s on the shared CPU
def test_readers_say_when_shown_cells_were_computed_with_other_settings(tmp_path, capsys):
    a = write_config(tmp_path, SMALL, name="a.toml")
    assert main(["run", "--config", str(a), "--no-progress"]) == 0
    # same labels, another sampler setting: only the none row is recomputed
    c = write_config(tmp_path, SMALL.replace("num_inference_steps = 2", "num_inference_steps = 3"), name="c.toml")
    assert main(["run", "--config", str(c), "--no-progress", "--only", "none/none/jpeg(quality=90)/*"]) == 0
    capsys.readouterr()
    assert main(["show", "--config", str(c), "--metric", "bit_accuracy", "--format", "csv"]) == 0
    err = capsys.readouterr().err
    assert "note: 2 of the 3 cells" in err and "other settings" in err
    assert main(["leaderboard", "--config", str(c), "-q", "--out-json", str(tmp_path / "c.json"),
                 "--out-md", str(tmp_path / "c.md")]) == 0
    assert "note: 2 of the 3 cells" in capsys.readouterr().err
    assert main(["show", "--config", str(a), "--metric", "bit_accuracy", "--format", "csv"]) == 0
    assert "note: 1 of the 3 cells" in capsys.readouterr().err  # the none row now has c's settings
