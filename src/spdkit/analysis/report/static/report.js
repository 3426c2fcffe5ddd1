// spdkit report: sortable tables and the Plotly plots of a page, drawn from its inlined data.
"use strict";

function sortTable(table, col, type, th) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const asc = !th.classList.contains("asc");
  table.querySelectorAll("th").forEach((h) => h.classList.remove("asc", "desc"));
  th.classList.add(asc ? "asc" : "desc");
  const key = (r) => {
    const t = r.cells[col].textContent.trim();
    if (type !== "num") return t;
    return t === "" ? -Infinity : parseFloat(t);
  };
  rows.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (asc ? 1 : -1));
  rows.forEach((r) => body.appendChild(r));
}

function setUpTables() {
  document.querySelectorAll("table.sortable").forEach((table) => {
    table.querySelectorAll("thead th").forEach((th, col) => {
      th.addEventListener("click", () => sortTable(table, col, th.dataset.type, th));
    });
  });
  document.querySelectorAll("tr[data-href]").forEach((tr) => {
    tr.addEventListener("click", (e) => {
      if (e.target.tagName !== "A") window.location.href = tr.dataset.href;
    });
  });
}

// Titles sit at the top left and Plotly's mode bar runs down the right edge, so the bar
// never covers a title.
const LAYOUT = { margin: { l: 55, r: 40, t: 40, b: 45 }, font: { size: 11 }, modebar: { orientation: "v" } };

function newPlot(el, traces, layout) {
  const full = Object.assign({}, LAYOUT, layout);
  if (full.title) full.title = Object.assign({ x: 0.01, xanchor: "left" }, full.title);
  return Plotly.newPlot(el, traces, full, { responsive: true, displaylogo: false });
}

function plot(id, traces, layout) {
  const el = document.getElementById(id);
  if (!el || !window.Plotly) return;
  newPlot(el, traces, layout);
}

function curves(metrics, keys, title, logY) {
  return {
    traces: keys.map((k) => ({
      x: metrics.filter((m) => m[k] !== undefined).map((m) => m.step),
      y: metrics.filter((m) => m[k] !== undefined).map((m) => m[k]),
      name: k, mode: "lines", type: "scatter",
    })),
    layout: { title: { text: title }, xaxis: { title: { text: "step" } }, yaxis: { type: logY ? "log" : "linear" } },
  };
}

function drawIndex(d) {
  const c1 = curves(d.metrics, d.loss_keys, "loss terms", true);
  plot("plot-losses", c1.traces, c1.layout);
  const c2 = curves(d.metrics, d.l0_keys, "L0 (CI > threshold) per module", false);
  plot("plot-l0", c2.traces, c2.layout);
}

function bars(id, vec, title, xTitle) {
  plot(id, [{ x: vec.index.map(String), y: vec.value, type: "bar", marker: { color: "#3b6fb6" } }],
    { title: { text: title }, xaxis: { title: { text: xTitle }, type: "category" } });
}

function drawSubcomponent(d) {
  bars("plot-u", d.u, "U[:, c] (output side)" + (d.u_top ? ": largest entries" : ""), "output index");
  bars("plot-v", d.v, "V[c, :] (input side)" + (d.v_top ? ": largest entries" : ""), "input index");
  const mids = d.bins.slice(0, -1).map((b, i) => (b + d.bins[i + 1]) / 2);
  plot("plot-hist", [{ x: mids, y: d.hist, type: "bar", marker: { color: "#b4331e" } }],
    { title: { text: "CI on " + d.n_rows + " rows" }, xaxis: { title: { text: "CI" } }, yaxis: { type: "log", title: { text: "rows" } } });
  if (d.one_hot) {
    plot("plot-onehot", [{ x: d.one_hot.map((_, i) => String(i)), y: d.one_hot, type: "bar", marker: { color: "#137333" } }],
      { title: { text: "CI on one-hot inputs" }, xaxis: { title: { text: "feature" }, type: "category" }, yaxis: { range: [0, 1.1] } });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpTables();
  const el = document.getElementById("page-data");
  const d = el ? JSON.parse(el.textContent) : {};
  if (d.page === "index") drawIndex(d);
  if (d.page === "subcomponent") drawSubcomponent(d);
  if ((d.page === "live" || d.page === "search") && window.setUpLive) window.setUpLive(d);
});
