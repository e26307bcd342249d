"""Progress without bars (``--no-progress``, or standard error not a terminal): plain lines in the log, so that a
long run under nohup or in CI says where it is."""

from __future__ import annotations

import pytest

from markbench.config import load_config
from markbench.progress import Progress, progress_line
from markbench.runner import Runner

from .conftest import MICRO_TOML, write_config


def test_progress_line_states_done_total_elapsed_and_the_remaining_time():
    assert progress_line("tree_ring: inversion", 2, 8, 120.0) == \
        "  tree_ring: inversion: 2/8 in 120 s, about 360 s left"
    assert progress_line("x", 8, 8, 99.6) == "  x: 8/8 in 100 s"
    assert progress_line("x", 3, None, 5.0) == "  x: 3 in 5 s"


def test_track_without_bars_logs_a_line_per_interval_and_yields_every_item():
    lines: list[str] = []
    quiet = Progress(enabled=False, log=lines.append, interval=0.0)
    assert list(quiet.track(range(3), description="loop")) == [0, 1, 2]
    assert [line.split(" in ")[0] for line in lines] == ["  loop: 1/3", "  loop: 2/3", "  loop: 3/3"]
    lines.clear()
    slow = Progress(enabled=False, log=lines.append, interval=3600.0)
    assert list(slow.track(iter(range(5)), description="loop")) == [0, 1, 2, 3, 4] and lines == []
    # bars requested (a terminal) or no log: no plain lines
    assert list(Progress(enabled=True, log=lines.append, interval=0.0).track(range(2))) == [0, 1] and lines == []
    assert list(Progress(enabled=False, interval=0.0).track(range(2))) == [0, 1]


TREE_RING_MICRO = MICRO_TOML.split("[[defenses]]")[0] + """
[[defenses]]
name = "tree_ring"
radius = 2.0
channel = 0
inversion_steps = 2

[[image_attacks]]
name = "none"
"""


def test_a_run_without_bars_logs_its_long_stages_and_the_inversions_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(Runner, "LONG_STAGE_SECONDS", 0.0)  # every stage counts as long here
    lines: list[str] = []
    cfg = load_config(write_config(tmp_path, TREE_RING_MICRO), {})
    summary = Runner(cfg, progress=Progress(enabled=False, log=lines.append, interval=0.0), log=lines.append).run()
    assert summary.ok
    text = "\n".join(lines)
    # each computed stage with its time, and the run seed where the stage has one (not the clean model's images);
    # the cell's [ok] after its stages
    for label in ("embed tree_ring", "generate tree_ring", "detect tree_ring"):
        assert any(line.startswith(f"  {label}") and "(seed 0): " in line and line.endswith(" s")
                   for line in lines), (label, text)
    assert any(line.startswith("  generate: ") and line.endswith(" s") for line in lines), text
    assert lines[-1].startswith("[ok] tree_ring")
    # the verifier's inversion (marked images, then negatives: 4 each, in one batch of 16) reports its batches
    batches = [line for line in lines if "inversion of 4 images (batches of 16): 1/1 in " in line]
    assert len(batches) == 2, text


def test_a_run_without_a_log_prints_nothing_and_keeps_its_results(tmp_path):
    cfg = load_config(write_config(tmp_path, TREE_RING_MICRO), {})
    assert Runner(cfg).run().ok  # the library default: no progress object, no log
