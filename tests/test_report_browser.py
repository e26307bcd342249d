"""The HTML report in a real headless browser (Debian's chromium, through its own --dump-dom and --screenshot).

Checks: the page's script runs with no console message and no error (``<html data-render="ok">``), the heatmap and
the robustness curves are drawn, ``#metric=NAME`` in the URL switches the heatmap to another metric (its cells change
to that metric's stored values), markup in labels stays text (no extra ``<script>`` element appears), and a
screenshot is saved (under pytest's tmp dir, and a copy at /tmp/report_screenshot.png).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                      "(apt-get install -y chromium)"),
]


def _fixture_module():
    path = Path(__file__).resolve().parent / "fixtures" / "make_fixture_db.py"
    spec = importlib.util.spec_from_file_location("make_fixture_db", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fx = _fixture_module()


class _Dom(HTMLParser):
    """Start tags (with attributes) and the text inside each heatmap cell of a serialised DOM."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.cells: dict[str, str] = {}
        self._cell: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "td" and "data-cell" in a:
            self._cell, self._text = a["data-cell"], []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells[self._cell] = " ".join(self._text)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None and data.strip():
            self._text.append(data.strip())


def chromium(args: list[str], tmp: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout)


def console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    from markbench.reports.html import render_report

    d = tmp_path_factory.mktemp("browser")
    fx.make_fixture(d)
    return render_report(d / "results.sqlite", d / "report.html")


def dump(page: Path, tmp: Path, fragment: str = "") -> tuple[_Dom, str, str]:
    proc = chromium(["--dump-dom", page.resolve().as_uri() + fragment], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = _Dom()
    dom.feed(proc.stdout)
    return dom, proc.stdout, proc.stderr


def html_attrs(dom: _Dom) -> dict:
    return next(a for t, a in dom.tags if t == "html")


def test_page_loads_without_errors_and_draws(page, tmp_path):
    dom, text, stderr = dump(page, tmp_path)
    assert html_attrs(dom)["data-render"] == "ok", html_attrs(dom)
    assert console_lines(stderr) == []
    heat = next(a for t, a in dom.tags if t == "div" and a.get("id") == "heatmap")
    assert heat["data-metric"] == "tpr@1e-06"
    assert dom.cells["alpha/none/jpeg/s0"] == "0.600 [0.500, 0.700] n=32"
    assert dom.cells[f"{fx.EVIL}/none/crop(strength=0.5)/s0"] == "failed"
    curves = [a for t, a in dom.tags if t == "div" and "curve" in a.get("class", "").split()]
    assert sorted(a["data-attack"] for a in curves) == ["gaussian_blur", "jpeg"]
    lines = [a for t, a in dom.tags if t == "polyline" and a.get("class") == "line"]
    assert len(lines) == 2 * 3  # two swept attacks x three defences
    assert len([a for t, a in dom.tags if t == "polygon" and a.get("class") == "band"]) >= 4
    assert len([a for t, a in dom.tags if t == "circle" and a.get("class") == "pt"]) == 20  # scatter: ok cells
    # markup in labels stayed text: the only script elements are the report's own two
    assert [t for t, _ in dom.tags].count("script") == 2
    assert "evil&lt;script&gt;alert(1)&lt;/script&gt;" in text  # serialised as a text node


def test_metric_switch_changes_the_heatmap(page, tmp_path):
    dom, _, stderr = dump(page, tmp_path, "#metric=bit_accuracy")
    assert html_attrs(dom)["data-render"] == "ok"
    assert console_lines(stderr) == []
    heat = next(a for t, a in dom.tags if t == "div" and a.get("id") == "heatmap")
    assert heat["data-metric"] == "bit_accuracy"
    select_opts = [a for t, a in dom.tags if t == "option"]
    assert any(a.get("value") == "bit_accuracy" for a in select_opts)
    assert dom.cells["alpha/none/jpeg/s0"] == "0.800 [0.780, 0.820] n=32"  # was 0.600 for tpr@1e-06
    assert dom.cells["none/none/none/s0"] == "0.500 [0.480, 0.520] n=32"
    tds = {a["data-cell"]: a for t, a in dom.tags if t == "td" and "data-cell" in a}
    assert float(tds["alpha/none/jpeg/s0"]["data-value"]) == pytest.approx(0.8)
    # a metric without a direction is drawn in blue
    dom2, _, _ = dump(page, tmp_path, "#metric=bit_accuracy_neg")
    tds2 = {a["data-cell"]: a for t, a in dom2.tags if t == "td" and "data-cell" in a}
    r, g, b = map(int, re.search(r"rgb\((\d+), (\d+), (\d+)\)", tds2["alpha/none/jpeg/s0"]["style"]).groups())
    assert b > g > r
    # an unknown metric falls back to the primary one instead of breaking the page
    dom3, _, stderr3 = dump(page, tmp_path, "#metric=%3Cscript%3E")
    assert html_attrs(dom3)["data-render"] == "ok" and console_lines(stderr3) == []
    assert next(a for t, a in dom3.tags if t == "div" and a.get("id") == "heatmap")["data-metric"] == "tpr@1e-06"


def test_screenshot(page, tmp_path):
    shot = tmp_path / "report.png"
    proc = chromium([f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars",
                     page.resolve().as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console_lines(proc.stderr) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    try:
        shutil.copyfile(shot, "/tmp/report_screenshot.png")
    except OSError:  # pragma: no cover - a read-only /tmp is no reason to fail
        pass
