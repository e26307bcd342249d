(function () {
  "use strict";
  var errors = [];
  function finish() {
    document.documentElement.setAttribute("data-render", errors.length ? "error: " + errors.join("; ") : "ok");
    var box = document.getElementById("js-errors");
    if (box && errors.length) { box.hidden = false; box.textContent = "Report script error: " + errors.join("; "); }
  }
  window.addEventListener("error", function (ev) { errors.push(String(ev.message || ev)); finish(); });

  var NS = "http://www.w3.org/2000/svg";
  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#7f7f7f", "#bcbd22"];
  var D, info = {}, byPos = {}, rowColour = {};

  function fmt(v) {
    if (v === null || v === undefined || isNaN(v)) return "-";
    var a = Math.abs(v);
    if (a < 10) return v.toFixed(3);
    if (a < 1e4) return v.toFixed(1);
    return v.toPrecision(3);
  }
  function el(tag, attrs, text) {
    var n = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { n.setAttribute(k, attrs[k]); });
    if (text !== undefined) n.textContent = text;
    return n;
  }
  function sv(parent, tag, attrs, text) {
    var n = document.createElementNS(NS, tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { n.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) n.textContent = text;
    if (parent) parent.appendChild(n);
    return n;
  }
  function val(cell, metric) {
    if (!cell || !cell.ok) return null;
    var v = cell.v[metric];
    if (!v || v[0] === null) return null;
    return {value: v[0], low: v[1], high: v[2], n: v[3], note: v[4] === null ? "" : D.notes[v[4]]};
  }
  function ciText(v) { return (v.low !== null && v.high !== null) ? "[" + fmt(v.low) + ", " + fmt(v.high) + "]" : "no interval"; }
  function range(values) {
    if (!values.length) return [0, 1];
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    if (lo >= 0 && hi <= 1) return [0, 1];
    return [lo, hi];
  }
  function colour(v, lo, hi, hib) {
    var t = hi <= lo ? 0.5 : Math.min(1, Math.max(0, (v - lo) / (hi - lo)));
    if (hib === null || hib === undefined) return "hsl(210,60%," + Math.round(95 - 30 * t) + "%)";
    var good = hib ? t : 1 - t;
    return "hsl(" + Math.round(120 * good) + ",55%,80%)";
  }
  function metricValues(metric) {
    var out = [];
    D.cells.forEach(function (c) { var v = val(c, metric); if (v) out.push(v.value); });
    return out;
  }

  // -- heatmap --------------------------------------------------------------------------------------------
  function renderHeatmap(metric) {
    var hib = info[metric] ? info[metric].hib : null;
    var rng = range(metricValues(metric));
    var table = el("table", {"class": "hm", "data-metric": metric});
    var thead = el("thead"), tr = el("tr");
    tr.appendChild(el("th", {"class": "corner"}, "defence \\ attack"));
    D.cols.forEach(function (c) { tr.appendChild(el("th", {scope: "col"}, c)); });
    thead.appendChild(tr); table.appendChild(thead);
    var tbody = el("tbody");
    D.rows.forEach(function (r) {
      var row = el("tr");
      row.appendChild(el("th", {scope: "row"}, r));
      D.cols.forEach(function (col) {
        var cell = byPos[r + "\u0000" + col], td;
        if (!cell) { td = el("td", {"class": "na", title: "not in the grid"}, "\u2013"); }
        else if (!cell.ok) {
          td = el("td", {"class": "failed", "data-cell": cell.label, title: cell.label + ": failed: " + cell.error});
          td.appendChild(el("span", {"class": "v"}, "failed"));
        } else {
          var v = val(cell, metric);
          if (!v) { td = el("td", {"class": "na", "data-cell": cell.label, title: cell.label + ": " + metric + " not measured"}, "\u2013"); }
          else {
            var tip = cell.label + "\n" + metric + " = " + fmt(v.value) + " (95% interval " + ciText(v) + ", N = " + v.n + ")" + (v.note ? "\n" + v.note : "");
            td = el("td", {"class": "c", "data-cell": cell.label, "data-value": String(v.value), title: tip});
            td.style.background = colour(v.value, rng[0], rng[1], hib);
            if (cell.outside) { td.className = "c outside"; td.title = tip + "\noutside the defence's threat model"; }
            td.appendChild(el("span", {"class": "v"}, fmt(v.value) + (cell.outside ? "\u2020" : "")));
            td.appendChild(el("span", {"class": "ci"}, ciText(v)));
            td.appendChild(el("span", {"class": "n"}, "n=" + v.n));
          }
        }
        row.appendChild(td);
      });
      tbody.appendChild(row);
    });
    table.appendChild(tbody);
    var box = document.getElementById("heatmap");
    box.textContent = "";
    box.appendChild(table);
    box.setAttribute("data-metric", metric);
  }

  // -- charts ---------------------------------------------------------------------------------------------
  function ticks(lo, hi, count) {
    var span = hi - lo;
    if (!(span > 0)) return [lo];
    var step = Math.pow(10, Math.floor(Math.log(span / count) / Math.LN10));
    var err = span / count / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var out = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toFixed(10));
    return out;
  }
  function axes(svg, W, H, M, xr, yr, xlabel, ylabel) {
    var sx = function (x) { return M.l + (xr[1] === xr[0] ? 0.5 : (x - xr[0]) / (xr[1] - xr[0])) * (W - M.l - M.r); };
    var sy = function (y) { return H - M.b - (yr[1] === yr[0] ? 0.5 : (y - yr[0]) / (yr[1] - yr[0])) * (H - M.t - M.b); };
    sv(svg, "rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, fill: "#fbfbfc", stroke: "#ccc"});
    ticks(yr[0], yr[1], 5).forEach(function (t) {
      sv(svg, "line", {x1: M.l, x2: W - M.r, y1: sy(t), y2: sy(t), stroke: "#e5e5e5"});
      sv(svg, "text", {x: M.l - 4, y: sy(t) + 3, "text-anchor": "end"}, fmt(t));
    });
    ticks(xr[0], xr[1], 5).forEach(function (t) {
      sv(svg, "line", {x1: sx(t), x2: sx(t), y1: H - M.b, y2: H - M.b + 4, stroke: "#888"});
      sv(svg, "text", {x: sx(t), y: H - M.b + 14, "text-anchor": "middle"}, fmt(t));
    });
    sv(svg, "text", {x: (M.l + W - M.r) / 2, y: H - 4, "text-anchor": "middle"}, xlabel);
    sv(svg, "text", {x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
                     transform: "rotate(-90 12 " + (M.t + H - M.b) / 2 + ")"}, ylabel);
    return [sx, sy];
  }
  function padRange(vals, unit) {
    if (!vals.length) return [0, 1];
    var lo = Math.min.apply(null, vals), hi = Math.max.apply(null, vals);
    if (unit && lo >= 0 && hi <= 1) return [0, 1];
    var pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }
  function legend(boxId, rows) {
    var box = document.getElementById(boxId);
    if (!box) return;
    box.textContent = "";
    rows.forEach(function (r) {
      var item = el("span", {"class": "item"});
      var sw = el("span", {"class": "sw"}); sw.style.background = rowColour[r];
      item.appendChild(sw); item.appendChild(document.createTextNode(r));
      box.appendChild(item);
    });
  }

  function renderCurves(metric) {
    var box = document.getElementById("curve-plots");
    box.textContent = "";
    if (!D.sweeps.length) {
      box.appendChild(el("p", {"class": "muted"}, "No attack was swept over two or more strengths in this grid."));
      legend("curve-legend", []);
      return;
    }
    var used = {};
    D.sweeps.forEach(function (s) {
      var W = 380, H = 250, M = {l: 48, r: 12, t: 10, b: 34};
      var series = [], all = [], xs = s.points.map(function (p) { return p[0]; });
      D.rows.forEach(function (r) {
        var pts = [];
        s.points.forEach(function (p) {
          var v = val(byPos[r + "\u0000" + p[1]], metric);
          if (v) { pts.push({x: p[0], v: v, col: p[1]}); all.push(v.value); if (v.low !== null) all.push(v.low); if (v.high !== null) all.push(v.high); }
        });
        var ref = s.ref ? val(byPos[r + "\u0000" + s.ref], metric) : null;
        if (ref) all.push(ref.value);
        if (pts.length) { series.push({row: r, pts: pts, ref: ref}); used[r] = true; }
      });
      var wrap = el("div", {"class": "plot curve", "data-attack": s.attack});
      wrap.appendChild(el("h4", null, s.attack + " (" + s.x + ")" + (s.multi_ma ? " under " + s.ma : "")));
      var svg = sv(null, "svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img"});
      sv(svg, "title", null, metric + " against " + s.attack + " " + s.x);
      var xr = padRange(xs, false), yr = padRange(all, true);
      var f = axes(svg, W, H, M, xr, yr, s.x, metric), sx = f[0], sy = f[1];
      series.forEach(function (se) {
        var c = rowColour[se.row];
        if (se.ref) sv(svg, "line", {x1: M.l, x2: W - M.r, y1: sy(se.ref.value), y2: sy(se.ref.value), stroke: c,
                                     "stroke-dasharray": "4 3", "stroke-opacity": 0.7});
        var band = se.pts.filter(function (p) { return p.v.low !== null && p.v.high !== null; });
        if (band.length > 1) {
          var up = band.map(function (p) { return sx(p.x) + "," + sy(p.v.high); });
          var down = band.slice().reverse().map(function (p) { return sx(p.x) + "," + sy(p.v.low); });
          sv(svg, "polygon", {points: up.concat(down).join(" "), fill: c, "fill-opacity": 0.15, stroke: "none",
                              "class": "band"});
        }
        sv(svg, "polyline", {points: se.pts.map(function (p) { return sx(p.x) + "," + sy(p.v.value); }).join(" "),
                             fill: "none", stroke: c, "stroke-width": 2, "class": "line", "data-row": se.row});
        se.pts.forEach(function (p) {
          var dot = sv(svg, "circle", {cx: sx(p.x), cy: sy(p.v.value), r: 3.5, fill: c});
          sv(dot, "title", null, se.row + " / " + p.col + ": " + metric + " = " + fmt(p.v.value) + " " + ciText(p.v) + " n=" + p.v.n);
        });
      });
      if (!series.length) sv(svg, "text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no values for " + metric);
      wrap.appendChild(svg);
      box.appendChild(wrap);
    });
    legend("curve-legend", D.rows.filter(function (r) { return used[r]; }));
  }

  function renderScatter(metric, xmetric) {
    var box = document.getElementById("scatter");
    box.textContent = "";
    if (!xmetric) return;
    var W = 560, H = 340, M = {l: 52, r: 14, t: 10, b: 36};
    var pts = [], xs = [], ys = [];
    D.cells.forEach(function (c) {
      var x = val(c, xmetric), y = val(c, metric);
      if (!x || !y) return;
      pts.push({c: c, x: x, y: y});
      [x.value, x.low, x.high].forEach(function (v) { if (v !== null) xs.push(v); });
      [y.value, y.low, y.high].forEach(function (v) { if (v !== null) ys.push(v); });
    });
    var wrap = el("div", {"class": "plot scatter"});
    var svg = sv(null, "svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img"});
    sv(svg, "title", null, metric + " against " + xmetric);
    var f = axes(svg, W, H, M, padRange(xs, false), padRange(ys, true), xmetric, metric), sx = f[0], sy = f[1];
    pts.forEach(function (p) {
      var col = rowColour[p.c.row];
      if (p.y.low !== null && p.y.high !== null)
        sv(svg, "line", {x1: sx(p.x.value), x2: sx(p.x.value), y1: sy(p.y.low), y2: sy(p.y.high), stroke: col, "stroke-opacity": 0.5});
      if (p.x.low !== null && p.x.high !== null)
        sv(svg, "line", {x1: sx(p.x.low), x2: sx(p.x.high), y1: sy(p.y.value), y2: sy(p.y.value), stroke: col, "stroke-opacity": 0.5});
      var dot = sv(svg, "circle", {cx: sx(p.x.value), cy: sy(p.y.value), r: p.c.clean ? 5.5 : 3.5, fill: col,
                                   stroke: p.c.clean ? "#000" : "none", "class": "pt"});
      sv(dot, "title", null, p.c.label + ": " + xmetric + " = " + fmt(p.x.value) + ", " + metric + " = " + fmt(p.y.value) + " " + ciText(p.y));
    });
    if (!pts.length) sv(svg, "text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no cell has both metrics");
    wrap.appendChild(svg);
    var lg = el("div", {"class": "legend", id: "scatter-legend"});
    wrap.appendChild(lg);
    box.appendChild(wrap);
    var rows = []; pts.forEach(function (p) { if (rows.indexOf(p.c.row) < 0) rows.push(p.c.row); });
    legend("scatter-legend", rows);
    lg.appendChild(el("span", {"class": "muted"}, "large outlined point: no attack"));
  }

  // -- state ----------------------------------------------------------------------------------------------
  function readHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i > 0) { try { out[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); } catch (err) { } }
    });
    return out;
  }
  function apply() {
    var h = readHash();
    var metric = info[h.metric] ? h.metric : D.primary;
    var sel = document.getElementById("metric");
    if (sel) sel.value = metric;
    var xsel = document.getElementById("xmetric");
    var xmetric = D.quality.indexOf(h.x) >= 0 ? h.x : (xsel ? xsel.value : D.quality[0]);
    if (xsel && xmetric) xsel.value = xmetric;
    var about = document.getElementById("metric-about");
    if (about && info[metric]) about.textContent = info[metric].about;
    renderHeatmap(metric);
    renderCurves(metric);
    renderScatter(metric, xmetric);
  }
  function setHash() {
    var sel = document.getElementById("metric"), xsel = document.getElementById("xmetric");
    var h = "metric=" + encodeURIComponent(sel.value) + (xsel ? "&x=" + encodeURIComponent(xsel.value) : "");
    if (history.replaceState) { history.replaceState(null, "", "#" + h); apply(); } else { location.hash = h; }
  }

  try {
    D = JSON.parse(document.getElementById("report-data").textContent);
    D.metrics.forEach(function (m) { info[m.name] = m; });
    D.cells.forEach(function (c) { byPos[c.row + "\u0000" + c.col] = c; });
    D.rows.forEach(function (r, i) { rowColour[r] = PALETTE[i % PALETTE.length]; });
    document.getElementById("metric").addEventListener("change", setHash);
    var xsel = document.getElementById("xmetric");
    if (xsel) xsel.addEventListener("change", setHash);
    window.addEventListener("hashchange", function () { try { apply(); } catch (err) { errors.push(String(err)); finish(); } });
    apply();
  } catch (err) {
    errors.push(String(err && err.message ? err.message : err));
  }
  finish();
})();
