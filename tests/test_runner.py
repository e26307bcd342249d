"""End-to-end runs of the harness on the micro pipeline (random weights, fixed seed, 4 images, 2 DDIM steps)."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from markbench.cli import main
from markbench.config import load_config
from markbench.runner import Runner
from markbench.store import ResultStore

from . import plugins_for_tests  # noqa: F401  (registers the _test plugins)
from .conftest import MICRO_TOML, write_config


def _run(path, only=None, rerun_failed=False, overrides=None):
    cfg = load_config(path, overrides or {})
    return cfg, Runner(cfg).run(only=only, rerun_failed=rerun_failed)


def _values(cfg, metric):
    store = ResultStore(cfg.output / "results.sqlite")
    df = store.dataframe()
    store.close()
    df = df[df.metric == metric]
    return {r.cell: r.value for r in df.itertuples()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    path = write_config(tmp)
    cfg, summary = _run(path)
    return tmp, path, cfg, summary


def test_grid_runs_and_stores_every_metric(finished):
    _, _, cfg, summary = finished
    assert summary.ok and summary.cells_ok == 6 and summary.cells_total == 6
    # shared work: one plain generation serves the control, the post-hoc mark and all negatives
    assert summary.stages_run["generate"] == 1 and summary.stages_run["mark"] == 1
    store = ResultStore(cfg.output / "results.sqlite")
    df = store.dataframe()
    cells = store.cells_frame()
    store.close()
    assert set(cells.status) == {"ok"} and len(cells) == 6
    assert {"bit_accuracy", "tpr@1e-06", "fpr@1e-06", "auc", "psnr_watermark", "ssim_attack"} <= set(df.metric)
    row = df[(df.cell == "dwtdctsvd/none/none/s0") & (df.metric == "bit_accuracy")].iloc[0]
    assert row.n == 4 and row.value > 0.9 and row.low <= row.value <= row.high
    assert '"bits": 48' in row.defense_params and row.git_hash is not None and "torch" in row.versions_json
    tpr = _values(cfg, "tpr@1e-06")
    assert tpr["dwtdctsvd/none/none/s0"] == 1.0
    assert tpr["none/none/none/s0"] == 0.0  # the control sits at chance: nothing at FPR 1e-6


def test_rerun_does_no_model_work(finished):
    _, path, _, _ = finished
    _, summary = _run(path)
    assert summary.stages_run == {} and summary.cells_skipped == 6 and summary.ok


def test_adding_an_attack_recomputes_only_its_stages(finished):
    tmp, _, _, _ = finished
    text = MICRO_TOML + '\n[[image_attacks]]\nname = "crop"\nscale = 0.5\nmode = "center"\n'
    path = write_config(tmp, text, name="bench_plus_crop.toml")
    cfg, summary = _run(path)
    # crop on the plain images (= the control's images = every negative) and on the marked ones; detection:
    # the control's positives and negatives are the same images (one stage), dwtdctsvd's are two
    assert summary.stages_run == {"image_attack": 2, "detect": 3}
    assert summary.cells_ok == 2 and summary.cells_skipped == 6


def test_a_relabelled_entry_finds_its_done_cells_under_the_new_labels(finished, capsys):
    """Labels are display names: renaming an entry (or no longer sweeping a value) recomputes nothing, and the
    config's readers must show the done cells under the names the config gives them now, not hide them."""
    tmp, _, _, _ = finished
    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "dwtdctsvd"\nlabel = "wm"') \
        .replace("quality = [90, 50]", "quality = [90, 50]\nlabel = \"j\"")
    path = write_config(tmp, text, name="bench_relabelled.toml")
    cfg, summary = _run(path)
    assert summary.stages_run == {} and summary.cells_skipped == 6
    store = ResultStore(cfg.output / "results.sqlite")
    cells = store.cells_frame()
    store.close()
    labels = set(cells.label)
    assert {"wm/none/j(quality=50)/s0", "wm/none/j(quality=90)/s0", "none/none/none/s0"} <= labels
    mine = cells[(cells.defense == "dwtdctsvd") & cells.image_attack.isin(["none", "jpeg"])]  # not other tests' cells
    assert len(mine) == 3 and set(mine.defense_label) == {"wm"} and not any(mine.label.str.startswith("dwtdctsvd/"))
    main(["show", "--config", str(path), "--metric", "bit_accuracy"])
    out = capsys.readouterr().out
    assert "wm" in out and "j(quality=50)" in out
    # and back: the first config's names return
    _run(finished[1])
    store = ResultStore(cfg.output / "results.sqlite")
    assert not any(store.cells_frame().label.str.startswith("wm/"))
    store.close()


def test_cell_numbers_do_not_depend_on_other_cells(finished, tmp_path):
    _, _, cfg_full, _ = finished
    path = write_config(tmp_path)
    cfg, summary = _run(path, only="dwtdctsvd/none/jpeg(quality=50)/*")
    assert summary.cells_total == 1 and summary.ok
    full = _values(cfg_full, "bit_accuracy")
    alone = _values(cfg, "bit_accuracy")
    assert alone == {"dwtdctsvd/none/jpeg(quality=50)/s0": full["dwtdctsvd/none/jpeg(quality=50)/s0"]}


def test_model_attack_stage_and_costs(tmp_path):
    text = MICRO_TOML + '\n[[model_attacks]]\nname = "_test_scale"\nfactor = 0.5\n'
    cfg, summary = _run(write_config(tmp_path, text), only="*/_test_scale*/none/*")
    assert summary.ok and summary.stages_run["model_attack"] == 1  # shared: no defence here changes weights
    cells = ResultStore(cfg.output / "results.sqlite").cells_frame()
    assert '"trainable_params": ' in cells.costs_json.iloc[0]


def test_failing_plugin_fails_only_its_cells(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MARKBENCH_TEST_FIXED", str(tmp_path / "fixed"))
    text = MICRO_TOML + "\n".join(f'\n[[image_attacks]]\nname = "{n}"\n' for n in ("_test_crash", "_test_nan",
                                                                                  "_test_shape"))
    path = write_config(tmp_path, text)
    code = main(["run", "--config", str(path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "6 failed" in out and "boom: this attack always fails" in out
    assert "returned 4 image(s) containing NaN" in out
    assert "returned images of shape (4, 3, 16, 16), expected (4, 3, 64, 64)" in out
    con = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    rows = dict(con.execute("select label, status from cells"))
    assert sum(v == "ok" for v in rows.values()) == 6 and sum(v == "failed" for v in rows.values()) == 6
    tb = con.execute("select traceback from cells where label like '%_test_crash%'").fetchone()[0]
    assert "RuntimeError: boom" in tb
    con.close()
    # without --rerun-failed the failed cells stay failed; with it, the fixed plugin succeeds
    (tmp_path / "fixed").write_text("")
    cfg, summary = _run(path, only="_test_crash")
    assert summary.stages_run == {} and len(summary.cells_failed) == 2
    cfg, summary = _run(path, only="_test_crash", rerun_failed=True)
    assert summary.cells_ok == 2 and summary.ok


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    flag = tmp_path / "interrupt"
    flag.write_text("")
    monkeypatch.setenv("MARKBENCH_TEST_INTERRUPT", str(flag))
    text = MICRO_TOML + '\n[[image_attacks]]\nname = "_test_interrupt"\n'
    path = write_config(tmp_path, text)
    cfg = load_config(path)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg).run()
    done = ResultStore(cfg.output / "results.sqlite").cell_status()
    assert 0 < len(done) < 8 and set(done.values()) == {"ok"}
    flag.unlink()
    _, summary = _run(path)
    assert summary.cells_skipped == len(done) and summary.cells_ok == 8 - len(done)
    assert "generate" not in summary.stages_run and summary.stages_cached >= 2  # the finished work is reused


def test_cli_dry_run_and_show(micro_config, capsys):
    assert main(["run", "--config", str(micro_config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 cells" in out and "generate" in out and "to run" in out
    assert main(["show", "--config", str(micro_config)]) == 2
    assert "no results yet" in capsys.readouterr().err


def test_generation_variants_are_rows_of_their_own(tmp_path):
    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "_test_sleeper"')
    cfg, summary = _run(write_config(tmp_path, text), only="_test_sleeper*/none/none/*")
    assert summary.ok and summary.cells_ok == 2
    acc = _values(cfg, "bit_accuracy")
    assert acc["_test_sleeper/none/none/s0"] == 1.0
    assert acc["_test_sleeper[no_trigger]/none/none/s0"] < 0.5


class _DeferredExecutor:
    """Stands in for a cluster without one: stages wait in a queue and run last-submitted-first when the runner
    waits, and a stage whose parent failed fails with an error of its own (as a Ray task's dependency does)."""

    capacity = 4

    def __init__(self):
        self.queue = []
        self.order = []

    def submit_stage(self, stage, env, deps=(), resources=None):
        from concurrent.futures import Future

        fut = Future()
        self.queue.append((stage, env, list(deps), fut))
        return fut

    def wait(self, futures, timeout=None):
        from markbench.stages import run_stage

        for item in reversed(self.queue):
            stage, env, deps, fut = item
            if all(d.done() for d in deps):
                self.queue.remove(item)
                self.order.append(stage.kind)
                if any(d.exception() for d in deps):
                    fut.set_exception(RuntimeError("a dependency failed"))
                    return
                try:
                    fut.set_result(run_stage(stage, env))
                except Exception as exc:
                    fut.set_exception(exc)
                return

    def shutdown(self):
        pass


def test_executor_with_capacity_gets_the_whole_graph_and_gives_the_same_numbers(finished, tmp_path):
    _, _, cfg_full, full = finished
    path = write_config(tmp_path, MICRO_TOML + '\n[[image_attacks]]\nname = "_test_crash"\n')
    cfg = load_config(path)
    executor = _DeferredExecutor()
    summary = Runner(cfg, executor=executor).run()
    # every missing stage was submitted before any ran and ran last-submitted-first where the graph allowed it
    # (the crashed attack's two stages and the detections behind them do not count as run)
    assert summary.stages_run == full.stages_run
    assert executor.order[0] == "embed" and executor.order.index("generate") > 0
    assert summary.cells_ok == 6 and len(summary.cells_failed) == 2
    assert {e for _, e in summary.cells_failed} == {
        "image_attack stage of '_test_crash' failed: RuntimeError: boom: this attack always fails"}
    for metric in ("bit_accuracy", "tpr@1e-06", "psnr_watermark", "auc"):
        mine = _values(cfg, metric)
        full_values = _values(cfg_full, metric)  # (that run's folder has since gained cells of other tests)
        assert len(mine) == 6 and mine == {cell: full_values[cell] for cell in mine}


def test_merging_two_marked_releases_averages_the_two_embeddings_weights(tmp_path):
    """End to end: merge(other = 'marked', alpha = 0.5) on a weight-marking defence stores the mean of the two
    independent embeddings' weights (the one key's offset and the other's), computed here from their own stages."""
    import textwrap

    from markbench.cache import ArtifactStore
    from markbench.plan import build_plan
    from markbench.stages import MODEL_PREFIX

    text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "_test_weightmark"').replace(
        "quality = [90, 50]", "quality = [90]").replace('"psnr", "ssim"', '"psnr"') + textwrap.dedent('''
        [[model_attacks]]
        name = "merge"
        other = "marked"
        alpha = 0.5
        ''')
    cfg, summary = _run(write_config(tmp_path, text))
    assert summary.cells_failed == []
    plan = build_plan(cfg)
    store = ArtifactStore(cfg.cache_dir)
    name = MODEL_PREFIX + "unet.conv_in.bias"
    embeds = sorted((s for s in plan.stages.values() if s.kind == "embed" and s.plugin.name == "_test_weightmark"),
                    key=lambda s: "release" in s.extra_dict)
    one, two = (store.tensors(s.key)[name] for s in embeds)
    merged = next(s for s in plan.stages.values() if s.kind == "model_attack" and s.inputs[0] == embeds[0].key)
    assert not torch.allclose(one, two)  # two keys
    assert torch.allclose(store.tensors(merged.key)[name], (one + two) / 2, atol=1e-6)


@pytest.mark.slow  # a micro run: about 35 s on the shared 2-core CPU
def test_a_cells_model_attack_cost_is_the_attack_on_its_watermarked_model_not_the_clean_twin(tmp_path):
    """A cell runs its model attack twice (on the watermarked model and on the clean base, for the negatives); the
    cost stored with the cell is the first's. `_test_bias_probe` records the conv_in bias sum it saw, which the
    weight mark's key offset makes different on the two models."""
    import json
    import textwrap

    from markbench import ModelAttack
    from markbench.registries import model_attacks

    if "_test_bias_probe" not in model_attacks:
        @model_attacks.register("_test_bias_probe")
        class BiasProbe(ModelAttack):
            """Records the UNet's conv_in bias sum as its cost; changes the weights a little."""

            version = "1"

            def apply(self, pipe, ctx):
                ctx.record_cost(bias_sum=float(pipe.unet.conv_in.bias.sum()))
                with torch.no_grad():
                    pipe.unet.conv_in.weight.mul_(0.99)
                return pipe

    # the weight mark alone (no `none` defence planned first), so the clean twin's stage comes after the marked one
    text = MICRO_TOML.replace('[[defenses]]\nname = "none"\n\n', "").replace(
        'name = "dwtdctsvd"', 'name = "_test_weightmark"').replace(
        "quality = [90, 50]", "quality = [90]").replace('"psnr", "ssim"', '"psnr"') + textwrap.dedent('''
        [[model_attacks]]
        name = "_test_bias_probe"
        ''')
    from markbench.cache import ArtifactStore
    from markbench.plan import build_plan

    cfg, summary = _run(write_config(tmp_path, text), only="_test_weightmark/_test_bias_probe/*")
    assert summary.cells_failed == []
    plan = build_plan(cfg)
    store = ArtifactStore(cfg.cache_dir)
    stages = [s for s in plan.stages.values() if s.kind == "model_attack" and s.plugin.name == "_test_bias_probe"]
    on = {plan.stages[s.inputs[0]].kind: store.meta(s.key)["costs"]["bias_sum"] for s in stages}
    assert set(on) == {"embed", "base"} and on["embed"] != on["base"]
    db = sqlite3.connect(cfg.output / "results.sqlite")
    (costs,) = db.execute("select costs_json from cells where defense_label = '_test_weightmark' and "
                          "model_attack_label = '_test_bias_probe'").fetchone()
    assert json.loads(costs)["model_attack"]["bias_sum"] == on["embed"]
