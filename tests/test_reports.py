"""Reports, leaderboards and compare, from a hand-made fixture database (no model work)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from markbench.errors import UserError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixture_db", HERE / "fixtures" / "make_fixture_db.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


fx = _load_fixture_module()


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fixture")
    fx.make_fixture(d)
    return d


@pytest.fixture(scope="module")
def report(fixture_dir, tmp_path_factory) -> str:
    from markbench.reports.html import render_report

    out = render_report(fixture_dir / "results.sqlite", tmp_path_factory.mktemp("rep") / "report.html")
    return out.read_text(encoding="utf-8")


def report_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m, "the report has no data block"
    return json.loads(m.group(1))


class _Tags(HTMLParser):
    """Collects start tags with their attributes (the real HTML tokenizer: what a browser would see as elements)."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(page: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(page)
    return p.tags


ALPHA_JPEG = "alpha/none/jpeg/s0"


# -- loading ---------------------------------------------------------------------------------------------------------
def test_load_results_grid(fixture_dir):
    from markbench.reports.data import load_results

    res = load_results(fixture_dir / "results.sqlite")
    assert len(res.cells) == 21
    assert [c.label for c in res.failed_cells] == [f"{fx.EVIL}/none/crop(strength=0.5)/s0"]
    assert res.primary_metric == "tpr@1e-06"
    assert res.rows() == ["none", "alpha", fx.EVIL]
    assert res.columns() == list(fx.ATTACKS)
    assert res.higher_is_better("fpr@1e-06") is False and res.higher_is_better("bit_accuracy_neg") is None
    cell = next(c for c in res.cells if c.label == ALPHA_JPEG)
    v = cell.metrics["tpr@1e-06"]
    assert (v.value, v.low, v.high, v.n) == pytest.approx((0.6, 0.5, 0.7, 32))
    sweeps = {s.attack: s for s in res.sweeps()}
    assert set(sweeps) == {"jpeg", "gaussian_blur"}  # crop has one strength: no curve
    assert sweeps["jpeg"].x_name == "quality"
    assert [x for x, _ in sweeps["jpeg"].points] == [50.0, 90.0]
    assert sweeps["gaussian_blur"].x_name == "strength"
    assert [x for x, _ in sweeps["gaussian_blur"].points] == [0.25, 0.5, 0.75]


def test_sweep_parameter_rules():
    from markbench.reports.data import sweep_parameter

    assert sweep_parameter([{"strength": 0.1, "k": 3}, {"strength": 0.2, "k": 5}]) == "strength"
    assert sweep_parameter([{"strength": None, "quality": 90}, {"strength": 0.5, "quality": 50}]) == "quality"
    assert sweep_parameter([{"quality": 90}]) is None
    assert sweep_parameter([{"quality": 90, "mode": "a"}, {"quality": 90, "mode": "b"}]) is None
    assert sweep_parameter([{"flag": True}, {"flag": False}]) is None


def test_bad_database_is_a_user_error(tmp_path):
    from markbench.reports.data import load_results

    with pytest.raises(UserError, match="no such results database"):
        load_results(tmp_path / "nope.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database")
    with pytest.raises(UserError, match="junk.sqlite"):
        load_results(junk)


# -- the HTML report -------------------------------------------------------------------------------------------------
def test_report_data_holds_stored_values(report):
    data = report_data(report)
    assert data["primary"] == "tpr@1e-06"
    assert [m["name"] for m in data["metrics"]][0] == "tpr@1e-06"
    assert {m["name"] for m in data["metrics"]} == {
        "tpr@1e-06", "fpr@1e-06", "tpr@0.01", "fpr@0.01", "bit_accuracy", "bit_accuracy_neg", "auc",
        "psnr_watermark", "ssim_watermark", "psnr_attack", "ssim_attack"}
    cells = {c["label"]: c for c in data["cells"]}
    v = cells[ALPHA_JPEG]["v"]
    assert v["tpr@1e-06"][:4] == pytest.approx([0.6, 0.5, 0.7, 32])
    assert v["bit_accuracy"][0] == pytest.approx(0.8)
    assert data["notes"][v["tpr@1e-06"][4]] == "fixture note for tpr@1e-06 <i>markup</i>"
    failed = cells[f"{fx.EVIL}/none/crop(strength=0.5)/s0"]
    assert failed["ok"] is False and failed["error"] == fx.FAILED_ERROR and failed["v"] == {}
    sweeps = {s["attack"]: s for s in data["sweeps"]}
    assert sweeps["gaussian_blur"]["points"] == [[0.25, "gaussian_blur(strength=0.25)"],
                                                 [0.5, "gaussian_blur(strength=0.5)"],
                                                 [0.75, "gaussian_blur(strength=0.75)"]]
    assert sweeps["jpeg"]["ref"] == "none"
    assert data["quality"] == ["psnr_watermark", "ssim_watermark"]


def test_report_heatmap_prerendered_for_the_primary_metric(report):
    tds = {a["data-cell"]: a for t, a in tags(report) if t == "td" and "data-cell" in a}
    assert float(tds[ALPHA_JPEG]["data-value"]) == pytest.approx(0.6)
    assert "(95% interval [0.500, 0.700], N = 32)" in tds[ALPHA_JPEG]["title"]
    assert tds[f"{fx.EVIL}/none/crop(strength=0.5)/s0"]["class"] == "failed"
    assert tds["alpha/none/none/s0"]["style"] == "background:hsl(120,55%,80%)"  # 1.0, higher is better: green
    assert tds["none/none/none/s0"]["style"] == "background:hsl(0,55%,80%)"  # 0.0: red
    m = re.search(r'data-cell="alpha/none/jpeg/s0".*?</td>', report, re.S)
    assert '<span class="v">0.600</span><span class="ci">[0.500, 0.700]</span><span class="n">n=32</span>' in m.group(0)
    heat = next(a for t, a in tags(report) if t == "table" and a.get("class") == "hm")
    assert heat["data-metric"] == "tpr@1e-06"


def test_report_is_self_contained(report):
    all_tags = tags(report)
    assert not [a for t, a in all_tags if t in ("link", "iframe", "object", "embed")]
    for t, a in all_tags:
        for attr in ("src", "href"):
            if attr in a:
                assert a[attr].startswith(("data:", "#")), (t, a[attr][:60])
    assert "http://" not in report.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in report
    scripts = [a for t, a in all_tags if t == "script"]
    assert len(scripts) == 2 and not any("src" in a for a in scripts)


def test_report_image_panels(report):
    imgs = [a for t, a in tags(report) if t == "img"]
    # two non-control defences x 3 prompts x (clean, watermarked, difference + 6 attacks)
    assert len(imgs) == 2 * 3 * 9
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    captions = [a["alt"] for a in imgs[:9]]
    assert captions == ["clean", "watermarked", "difference x10", "jpeg(quality=90)", "jpeg",
                        "gaussian_blur(strength=0.25)", "gaussian_blur(strength=0.5)",
                        "gaussian_blur(strength=0.75)", "crop(strength=0.5)"]
    assert "a red circle on a grey background" in report
    assert len(report.encode()) < 1_000_000


def test_amplified_difference_values():
    import numpy as np

    from markbench.reports.html import amplified_difference

    clean = np.full((4, 4, 3), 100, np.uint8)
    marked = clean.copy()
    marked[..., 2] = 106
    marked[0, 0, 0] = 0
    d = amplified_difference(clean, marked)
    assert d.dtype == np.uint8
    assert d[1, 1].tolist() == [0, 0, 60]
    assert d[0, 0, 0] == 255  # 100 x 10, clipped
    d2 = amplified_difference(clean, np.full((2, 2, 3), 100, np.uint8))  # other size: resized first
    assert d2.shape == clean.shape and d2.max() == 0


def test_report_escapes_everything(report):
    assert fx.MARKUP not in report
    assert "<img src=x" not in report
    assert "<b>boom</b>" not in report and "<b>run</b>" not in report and "<i>markup</i>" not in report
    assert "evil&lt;script&gt;alert(1)&lt;/script&gt;" in report  # labels, as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a blue square" in report  # the prompt
    assert "ValueError: &lt;b&gt;boom&lt;/b&gt;" in report  # the failed cell's error
    assert "\\u003cscript\\u003ealert(1)" in report  # inside the JSON block
    assert [t for t, _ in tags(report)].count("script") == 2
    assert report_data(report)["rows"][2] == fx.EVIL  # and the data still round-trips


def test_report_manifest(report):
    for text in ("fixture-run-1", "0123456789abcdef+dirty", "bench run --config fixture.toml", "negative policy",
                 "attacked: the negatives are", "Failed cells (1)", "Traceback (most recent call last)",
                 "run seconds", "Glossary", "True positive rate at a target false positive rate of 1e-06",
                 "&quot;comment&quot;: &quot;&lt;img src=x onerror=alert(2)&gt;&quot;"):
        assert text in report, text


def test_report_without_images(fixture_dir, tmp_path):
    from markbench.reports.html import render_report

    out = render_report(fixture_dir / "results.sqlite", tmp_path / "r.html", cache_dir=tmp_path / "nowhere")
    page = out.read_text()
    assert "No image panels" in page and str(tmp_path / "nowhere") in page
    assert not [a for t, a in tags(page) if t == "img"]


def test_report_and_leaderboard_with_seeds_and_model_attacks(tmp_path):
    from markbench.reports.data import load_results
    from markbench.reports.html import render_report
    from markbench.reports.leaderboard import build

    fx.make_fixture(tmp_path, seeds=(0, 1), model_attacks=("none", "finetune(steps=10)"))
    res = load_results(tmp_path / "results.sqlite")
    assert len(res.cells) == 2 * 2 * 21
    assert res.rows() == ["none s0", "alpha s0", f"{fx.EVIL} s0", "none s1", "alpha s1", f"{fx.EVIL} s1"]
    cols = res.columns()  # grouped by model attack, the unattacked column first
    assert cols[0] == "none | none" and cols[7] == "finetune(steps=10) | none"
    assert cols[8] == "finetune(steps=10) | jpeg(quality=90)" and len(cols) == 14
    assert sorted((s.model_attack_label, s.attack) for s in res.sweeps()) == [
        ("finetune(steps=10)", "gaussian_blur"), ("finetune(steps=10)", "jpeg"), ("none", "gaussian_blur"),
        ("none", "jpeg")]
    board = build(res)
    a = next(e for e in board["entries"] if e["defense_label"] == "alpha")
    # no per-image values stored in this fixture: the mean of the seeds, no interval, and how many embeddings
    assert a["clean"] == {"value": pytest.approx((1.0 + 0.98) / 2), "low": None, "high": None, "n": 64, "n_cells": 2,
                          "n_embeddings": 2, "n_attack_runs": 0}
    assert a["robustness"]["n_attacked"] == 2 * 2 * 7 - 2  # every cell but the two clean ones
    # the worst column (its value the mean over the two run seeds, as its interval nests them), not one seed's cell
    assert a["robustness"]["worst_attack"] == "finetune(steps=10) | gaussian_blur(strength=0.75)"
    assert a["robustness"]["worst"] == pytest.approx(min(a["per_attack"].values()))
    assert a["per_attack"]["finetune(steps=10) | none"] == pytest.approx((0.5 + 0.49) / 2)
    page = render_report(tmp_path / "results.sqlite", tmp_path / "r.html").read_text()
    data = report_data(page)
    assert data["cols"] == res.columns() and data["rows"] == res.rows()
    assert {s["ref"] for s in data["sweeps"]} == {"none | none", "finetune(steps=10) | none"}
    alts = [a["alt"] for t, a in tags(page) if t == "img"]
    assert "model attack: finetune(steps=10)" in alts
    assert fx.MARKUP not in page


def test_render_leaves_the_database_alone(fixture_dir, tmp_path):
    from markbench.reports.html import render_report

    db = fixture_dir / "results.sqlite"
    before = db.read_bytes()
    render_report(db, tmp_path / "r.html")
    assert db.read_bytes() == before


# -- leaderboard -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def board(fixture_dir):
    from markbench.reports.leaderboard import build
    from markbench.reports.data import load_results

    return build(load_results(fixture_dir / "results.sqlite"))


def test_leaderboard_schema(board):
    assert board["schema_version"] == 1 and board["kind"] == "markbench-leaderboard"
    for key, typ in (("generated", str), ("source", dict), ("metric", str), ("higher_is_better", bool),
                     ("negatives", str), ("n_images", int), ("grid", dict), ("entries", list), ("cells", list)):
        assert isinstance(board[key], typ), key
    assert set(board["source"]) == {"database", "run_ids", "run_name", "config_path", "git_hash", "versions"}
    assert set(board["grid"]) == {"defenses", "model_attacks", "image_attacks", "seeds", "metrics"}
    entry_keys = {"rank", "defense", "defense_label", "defense_params", "defense_version", "defense_origin",
                  "control", "clean", "robustness", "per_attack", "per_attack_summary", "quality", "n_cells",
                  "n_failed"}
    for e in board["entries"]:
        assert set(e) == entry_keys
        assert set(e["robustness"]) == {"mean", "worst", "worst_attack", "n_cells", "n_attacked"}
        assert isinstance(e["rank"], int) and isinstance(e["control"], bool)
        assert set(e["per_attack_summary"]) == set(e["per_attack"])
        for s in [e["clean"], *e["quality"].values(), *e["per_attack_summary"].values()]:
            assert set(s) == {"value", "low", "high", "n", "n_cells", "n_embeddings", "n_attack_runs"}
    assert len(board["cells"]) == 20 * 11  # ok cells x metrics
    assert set(board["cells"][0]) == {"defense_label", "model_attack_label", "image_attack_label", "seed", "metric",
                                      "value", "low", "high", "n", "higher_is_better"}
    json.loads(json.dumps(board, allow_nan=False))  # strict JSON


def test_leaderboard_ranking_values(board):
    e = {x["defense_label"]: x for x in board["entries"]}
    assert [x["defense_label"] for x in board["entries"]] == ["alpha", fx.EVIL, "none"]
    assert [x["rank"] for x in board["entries"]] == [1, 2, 3]
    a = e["alpha"]
    assert a["robustness"]["mean"] == pytest.approx((0.95 + 0.6 + 0.9 + 0.5 + 0.1 + 0.75) / 6)
    assert a["robustness"]["worst"] == pytest.approx(0.1)
    assert a["robustness"]["worst_attack"] == "gaussian_blur(strength=0.75)"
    assert a["robustness"]["n_cells"] == 6 and a["n_failed"] == 0
    assert a["clean"] == {"value": 1.0, "low": 0.9, "high": 1.0, "n": 32, "n_cells": 1, "n_embeddings": 1,
                          "n_attack_runs": 0}
    assert a["quality"]["psnr_watermark"] == pytest.approx({"value": 38.5, "low": 38.0, "high": 39.0, "n": 32,
                                                           "n_cells": 1, "n_embeddings": 1, "n_attack_runs": 0})
    assert a["per_attack"]["jpeg"] == pytest.approx(0.6)
    ev = e[fx.EVIL]
    assert ev["robustness"]["mean"] == pytest.approx((0.7 + 0.3 + 0.6 + 0.3 + 0.05) / 5)
    assert ev["robustness"]["n_cells"] == 5 and ev["robustness"]["n_attacked"] == 6 and ev["n_failed"] == 1
    assert e["none"]["control"] is True and e["none"]["robustness"]["mean"] == 0.0


def test_leaderboard_other_metric(fixture_dir):
    from markbench.reports.data import load_results
    from markbench.reports.leaderboard import build

    res = load_results(fixture_dir / "results.sqlite")
    b = build(res, "fpr@0.01")  # lower is better: equal FPRs tie, the control goes last
    assert b["higher_is_better"] is False and b["entries"][-1]["defense_label"] == "none"
    with pytest.raises(UserError, match="tpr@1e-6.*did you mean 'tpr@1e-06'"):
        build(res, "tpr@1e-6")


def test_leaderboard_markdown(board):
    from markbench.reports.leaderboard import to_markdown

    md = to_markdown(board)
    lines = md.splitlines()
    assert lines[0] == "### MarkBench leaderboard: `tpr@1e-06` (higher is better)"
    rows = [ln for ln in lines if re.match(r"\| \d+ \|", ln)]
    assert rows[0].startswith("| 1 | alpha | 1.000 [0.900, 1.000] | 0.633 (6 cells) | 0.100 (gaussian\\_blur")
    assert rows[1].startswith("| 2 | evil&lt;script&gt;alert(1)&lt;/script&gt; |")
    assert rows[2].startswith("| 3 | none (control) |")
    assert fx.MARKUP not in md
    assert all(ln.count("|") == lines[2].count("|") for ln in rows)  # a pipe in a label cannot split a cell


def test_leaderboard_files_round_trip(fixture_dir, tmp_path):
    from markbench.reports.leaderboard import load_leaderboard, write_leaderboard

    board = write_leaderboard(fixture_dir / "results.sqlite", tmp_path / "lb.json", tmp_path / "lb.md")
    assert load_leaderboard(tmp_path / "lb.json")["entries"] == json.loads(json.dumps(board["entries"]))
    assert (tmp_path / "lb.md").read_text().startswith("### MarkBench leaderboard")
    bad = tmp_path / "v2.json"
    bad.write_text(json.dumps({**board, "schema_version": 2}))
    with pytest.raises(UserError, match="schema_version 2 is not supported"):
        load_leaderboard(bad)


# -- compare ---------------------------------------------------------------------------------------------------------
def P(value, low=None, high=None, hib=True, n=32):
    from markbench.reports.compare import Point

    return Point(value, low, high, n, hib)


K = ("alpha", "none", "jpeg", 0, "tpr@1e-06")


def classify(base, cur, tol=0.0):
    from markbench.reports.compare import compare_cells

    r = compare_cells({K: base}, {K: cur}, tol)
    kinds = [name for name in ("regressions", "improvements", "changed") if getattr(r, name)]
    return kinds[0] if kinds else ("noise" if r.within_noise else "other")


@pytest.mark.parametrize("base, cur, tol, expected", [
    (P(0.9, 0.85, 0.95), P(0.7, 0.6, 0.8), 0.0, "regressions"),  # disjoint, worse
    (P(0.7, 0.6, 0.8), P(0.9, 0.85, 0.95), 0.0, "improvements"),  # disjoint, better
    (P(0.9, 0.8, 1.0), P(0.75, 0.6, 0.85), 0.0, "noise"),  # worse but the intervals overlap
    (P(0.9, 0.8, 1.0), P(0.7, 0.6, 0.8), 0.0, "noise"),  # touching intervals count as overlap
    (P(0.9, 0.85, 0.95), P(0.8, 0.7, 0.84), 0.1, "noise"),  # disjoint, but |change| = 0.1 is not > tolerance
    (P(0.9, 0.85, 0.95), P(0.8, 0.7, 0.84), 0.05, "regressions"),  # ... beyond a smaller tolerance
    (P(0.01, 0.0, 0.02, hib=False), P(0.2, 0.1, 0.3, hib=False), 0.0, "regressions"),  # FPR up: worse
    (P(0.2, 0.1, 0.3, hib=False), P(0.01, 0.0, 0.02, hib=False), 0.0, "improvements"),
    (P(0.5, 0.45, 0.55, hib=None), P(0.8, 0.75, 0.85, hib=None), 0.0, "changed"),  # no direction: never a regression
    (P(0.9), P(0.9), 0.0, "noise"),  # no intervals: a point is its own interval
    (P(0.9), P(0.8), 0.0, "regressions"),
    (P(0.9), P(0.8), 0.2, "noise"),
])
def test_compare_classification(base, cur, tol, expected):
    assert classify(base, cur, tol) == expected


def test_compare_missing_new_and_not_comparable():
    from markbench.reports.compare import compare_cells

    k2, k3, k4 = (*K[:4], "auc"), ("beta", "none", "none", 0, "auc"), (*K[:3], 1, "auc")
    r = compare_cells({K: P(0.5), k2: P(0.7), k4: P(0.1)}, {K: P(None), k2: P(0.7), k3: P(0.2)})
    assert r.missing == [k4] and r.new == [k3] and r.not_comparable == [K] and r.within_noise == 1
    assert r.ok
    with pytest.raises(UserError, match="tolerance"):
        compare_cells({}, {}, -0.1)


@pytest.fixture(scope="module")
def shifted_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shifted")
    fx.make_fixture(d, images=False, drop={("none", "crop(strength=0.5)")}, shift={
        ("alpha", "jpeg"): {"tpr@1e-06": -0.4},  # 0.6 [0.5, 0.7] -> 0.2 [0.1, 0.3]: regression
        ("alpha", "gaussian_blur(strength=0.5)"): {"tpr@1e-06": 0.05},  # overlapping: noise
        (fx.EVIL, "jpeg"): {"tpr@1e-06": 0.4, "fpr@0.01": 0.5},  # better TPR, worse FPR
        ("alpha", "none"): {"psnr_watermark": -3.0},  # 38.5 [38, 39] -> 35.5 [35, 36]: regression
    })
    return d


def test_compare_databases_end_to_end(fixture_dir, shifted_dir):
    from markbench.reports.compare import compare, to_markdown

    r = compare(fixture_dir / "results.sqlite", shifted_dir)
    reg = {(c.key[0], c.key[2], c.key[4]): round(c.delta, 6) for c in r.regressions}
    assert reg == {("alpha", "jpeg", "tpr@1e-06"): -0.4, (fx.EVIL, "jpeg", "fpr@0.01"): 0.5,
                   ("alpha", "none", "psnr_watermark"): -3.0}
    imp = {(c.key[0], c.key[2], c.key[4]) for c in r.improvements}
    assert imp == {(fx.EVIL, "jpeg", "tpr@1e-06")}
    assert len(r.missing) == 11 and {k[2] for k in r.missing} == {"crop(strength=0.5)"} and not r.new
    assert r.within_noise == 19 * 11 - 4
    md = to_markdown(r)
    assert md.startswith("### MarkBench compare: **3 regression(s)**")
    assert "| alpha / jpeg | tpr@1e-06 | 0.600 [0.500, 0.700] | 0.200 [0.100, 0.300] | -0.400 |" in md
    assert fx.MARKUP not in md


def test_compare_same_results_is_clean(fixture_dir, tmp_path):
    from markbench.reports.compare import compare
    from markbench.reports.leaderboard import write_leaderboard

    write_leaderboard(fixture_dir / "results.sqlite", tmp_path / "lb.json")
    r = compare(tmp_path / "lb.json", fixture_dir / "results.sqlite")  # a leaderboard against its own database
    assert r.ok and not r.improvements and not r.missing and not r.new and r.within_noise == 220


# -- the command line ------------------------------------------------------------------------------------------------
def run_cli(*argv, capsys=None):
    from markbench.cli import main

    return main(list(argv))


def test_cli_report_and_leaderboard(fixture_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert run_cli("report", "--output", str(fixture_dir), "--out", str(out)) == 0
    assert "wrote" in capsys.readouterr().out and report_data(out.read_text())["primary"] == "tpr@1e-06"
    assert run_cli("leaderboard", "--output", str(fixture_dir), "--out-json", str(tmp_path / "lb.json"),
                   "--out-md", str(tmp_path / "lb.md")) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "lb.md").read_text()
    assert json.loads((tmp_path / "lb.json").read_text())["entries"][0]["defense_label"] == "alpha"
    assert run_cli("leaderboard", "--output", str(fixture_dir), "-q") == 0  # defaults: under the run folder
    assert (fixture_dir / "leaderboard.json").exists() and (fixture_dir / "leaderboard.md").exists()
    assert capsys.readouterr().out == ""


def test_cli_compare_exit_codes(fixture_dir, shifted_dir, tmp_path, capsys):
    assert run_cli("leaderboard", "--output", str(fixture_dir), "-q", "--out-json", str(tmp_path / "base.json"),
                   "--out-md", str(tmp_path / "base.md")) == 0
    assert run_cli("compare", str(tmp_path / "base.json"), str(fixture_dir)) == 0
    assert "no regression" in capsys.readouterr().out
    assert run_cli("compare", str(tmp_path / "base.json"), str(shifted_dir / "results.sqlite"),
                   "--out-md", str(tmp_path / "c.md"), "--out-json", str(tmp_path / "c.json")) == 1
    assert "3 regression(s)" in (tmp_path / "c.md").read_text()
    assert len(json.loads((tmp_path / "c.json").read_text())["regressions"]) == 3
    assert run_cli("compare", str(fixture_dir), str(shifted_dir), "--tolerance", "5") == 0  # all moves <= 5
    assert run_cli("compare", str(fixture_dir), str(shifted_dir), "--tolerance", "5", "--fail-on-missing") == 1
    capsys.readouterr()
    # bad input: exit 2 with one line naming the file
    assert run_cli("compare", str(tmp_path / "nope.json"), str(fixture_dir)) == 2
    assert "nope.json: no such file or folder" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert run_cli("compare", str(tmp_path / "bad.json"), str(fixture_dir)) == 2
    (tmp_path / "other.json").write_text('{"kind": "something"}')
    assert run_cli("compare", str(tmp_path / "other.json"), str(fixture_dir)) == 2
    assert "not a MarkBench leaderboard" in capsys.readouterr().err
    assert run_cli("compare", str(tmp_path), str(fixture_dir)) == 2  # a folder without results.sqlite
    assert run_cli("compare", str(fixture_dir), str(fixture_dir), "--tolerance", "-1") == 2


def test_cli_report_without_results_is_a_user_error(tmp_path, capsys):
    assert run_cli("report", "--output", str(tmp_path / "empty")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "results.sqlite: no results yet" in err and err.count("\n") == 1


def test_cli_help_has_examples(capsys):
    for cmd in ("report", "leaderboard", "compare"):
        assert run_cli(cmd, "--help") == 0
        assert f"examples:\n  bench {cmd}" in capsys.readouterr().out


def test_modules_import_nothing_heavy():
    code = ("import sys, reports.cli, reports.html, reports.leaderboard, reports.compare, reports.data; "
            "heavy = [m for m in ('torch', 'pandas', 'numpy', 'PIL', 'diffusers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_glossary_tells_an_analytic_threshold_from_an_empirical_one():
    from markbench.reports.data import describe_metric

    assert "analytic threshold" in describe_metric("tpr@1e-06")
    empirical = describe_metric("tpr@fpr<=1/32")
    assert "empirical threshold set on 32 negatives" in empirical and "1/32" in empirical
    assert "not an analytic guarantee" in empirical and "analytic threshold that" not in empirical
    assert describe_metric("fpr@fpr<=3/32").startswith("False positive rate") and "at most 3 of them" in \
        describe_metric("fpr@fpr<=3/32")


def test_leaderboard_combines_seeds_by_a_hierarchical_bootstrap_and_counts_embeddings(tmp_path):
    """Two seeds (two embeddings, two attack runs) of one defence, with their per-image outcomes stored: the
    summary is the mean of the seeds with the hierarchical-bootstrap interval of those outcomes, and says so."""
    import numpy as np

    from markbench import stats
    from markbench.config import load_config
    from markbench.plan import build_plan
    from markbench.plugins import Measurement
    from markbench.store import ResultStore
    from markbench.reports.data import load_results
    from markbench.reports.leaderboard import build, to_markdown
    from tests.conftest import write_config

    cfg = load_config(write_config(tmp_path), {"run.seeds": [0, 1]})
    cells = [c for c in build_plan(cfg).cells if c.defense.name == "dwtdctsvd"]
    store = ResultStore(cfg.output / "results.sqlite")
    store.start_run("r1", "test", "bench.toml", {"run": {"primary_metric": "tpr@1e-06"}}, {}, "abc")
    outcomes = {0: [1.0] * 15 + [0.0], 1: [1.0] * 8 + [0.0] * 8}  # the second embedding is much weaker
    for c in cells:
        s = outcomes[c.seed] if c.image_attack.name == "none" else [0.0] * 16
        store.write_cell("r1", c, "ok", [Measurement("tpr@1e-06", float(np.mean(s)), 0.0, 1.0, 16, samples=tuple(s))],
                         n_images=16, negatives="attacked")
    store.close()
    board = build(load_results(cfg.output / "results.sqlite"))
    entry = next(e for e in board["entries"] if e["defense"] == "dwtdctsvd")
    clean = entry["clean"]
    ref = stats.hierarchical_bootstrap([outcomes[0], outcomes[1]])
    assert clean["value"] == pytest.approx((15 / 16 + 8 / 16) / 2)
    assert (clean["low"], clean["high"]) == pytest.approx((ref.low, ref.high))
    assert clean["n_embeddings"] == 2 and clean["n_attack_runs"] == 0 and clean["n"] == 32
    assert clean["high"] - clean["low"] > 0.3  # the spread between the two embeddings is in the interval
    per = entry["per_attack_summary"]
    assert all(s["n_embeddings"] == 2 and s["n_attack_runs"] == 0 and s["value"] == 0.0 for s in per.values())
    assert "(2 embeddings)" in to_markdown(board)


def test_leaderboard_combines_auc_over_seeds_resampling_positives_and_negatives(tmp_path):
    """ROC AUC stores both samples' placements (the negatives' under ``auc:negatives`` in the samples table): two
    seeds of a defence give the mean AUC with the two-sample hierarchical interval (bench.stats.hierarchical_auc),
    computed here from the same placements."""
    import numpy as np

    from markbench import stats
    from markbench.config import load_config
    from markbench.measures.detection import _measurement
    from markbench.plan import build_plan
    from markbench.reports.data import load_results
    from markbench.reports.leaderboard import build
    from markbench.store import ResultStore
    from tests.conftest import write_config

    cfg = load_config(write_config(tmp_path), {"run.seeds": [0, 1], "run.primary_metric": "auc"})
    cells = [c for c in build_plan(cfg).cells if c.defense.name == "dwtdctsvd"]
    rng = np.random.default_rng(0)
    neg = rng.normal(0, 1, 16)
    placements = {0: stats.auc_placements(rng.normal(3, 1, 16), neg), 1: stats.auc_placements(rng.normal(0.5, 1, 16),
                                                                                              neg)}
    store = ResultStore(cfg.output / "results.sqlite")
    store.start_run("r1", "test", "bench.toml", {"run": {"primary_metric": "auc"}}, {}, "abc")
    for c in cells:
        pl = placements[c.seed]
        m = _measurement("auc", stats.Estimate(pl.mean(), 0.0, 1.0, 32), samples=pl.pos, samples_neg=pl.neg)
        store.write_cell("r1", c, "ok", [m], n_images=16, negatives="attacked")
    store.close()
    results = load_results(cfg.output / "results.sqlite")
    v = results.value(next(c for c in results.cells if c.defense_label == "dwtdctsvd" and c.seed == 1), "auc")
    np.testing.assert_allclose(v.samples, placements[1].pos, atol=1e-6)
    np.testing.assert_allclose(v.samples_neg, placements[1].neg, atol=1e-6)
    clean = next(e for e in build(results)["entries"] if e["defense"] == "dwtdctsvd")["clean"]
    rounded = [stats.Placements(np.round(p.pos, 6), np.round(p.neg, 6)) for p in (placements[0], placements[1])]
    ref = stats.hierarchical_auc(rounded)
    assert clean["value"] == pytest.approx((placements[0].mean() + placements[1].mean()) / 2, abs=1e-6)
    assert (clean["low"], clean["high"]) == pytest.approx((ref.low, ref.high))
    assert clean["interval"] == "hierarchical bootstrap, positives and negatives resampled apart"
    assert clean["n"] == 64 and clean["n_embeddings"] == 2
