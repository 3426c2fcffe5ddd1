// spdkit serve: the live page. CI of a typed input per module, and the output with
// clusters / subcomponents switched off, from the server's JSON API.
"use strict";

async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function drawCI(result) {
  const box = document.getElementById("ci-plots");
  box.innerHTML = "";
  for (const [module, t] of Object.entries(result.modules)) {
    const div = document.createElement("div");
    div.className = "plot";
    div.dataset.module = module;
    box.appendChild(div);
    const x = result.tokens ? result.tokens.map((tok, i) => i + ":" + tok) : t.ci.map((_, i) => String(i));
    const title = module + ": " + t.indices.length + " active";
    if (!t.indices.length) {
      newPlot(div, [], { title: { text: title } });
      continue;
    }
    const z = t.indices.map((_, j) => t.ci.map((row) => row[j]));
    newPlot(div, [{ z, x, y: t.indices.map((c) => "c" + c), type: "heatmap", zmin: 0, zmax: 1, colorscale: "Reds" }],
      { title: { text: title }, xaxis: { type: "category", title: { text: result.tokens ? "token" : "input" } } });
  }
}

function table(rows, headers) {
  const h = "<tr>" + headers.map((x) => "<th>" + x + "</th>").join("") + "</tr>";
  return "<table class='kv'>" + h + rows.map((r) => "<tr>" + r.map((x) => "<td>" + x + "</td>").join("") + "</tr>").join("") + "</table>";
}

function esc(s) {
  return String(s).replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[ch]));
}

function drawAblation(r) {
  const box = document.getElementById("ablate-result");
  if (r.kind === "text") {
    const rows = r.top.target.map((_, i) => ["target", "all_on", "ablated"].map((k) => esc(r.top[k][i].token) + " " + r.top[k][i].p));
    box.innerHTML = "<p>KL(target ‖ ·) at the last token: all on " + r.kl_last.all_on.toFixed(4) + ", ablated <b id='kl-ablated'>" + r.kl_last.ablated.toFixed(4) +
      "</b>; mean over tokens: " + r.kl_mean.all_on.toFixed(4) + " / " + r.kl_mean.ablated.toFixed(4) + "</p>" +
      table(rows, ["target", "all subcomponents on", "with those off"]);
  } else {
    const n = r.outputs.target.length;
    box.innerHTML = "<p>MSE to the target: all on " + r.mse.all_on.toExponential(3) + ", ablated <b id='mse-ablated'>" + r.mse.ablated.toExponential(3) + "</b></p><div id='plot-out' class='plot'></div>";
    const x = Array.from({ length: n }, (_, i) => String(i));
    newPlot("plot-out", ["target", "all_on", "ablated"].map((k) => ({ x, y: r.outputs[k], name: k, type: "bar" })),
      { title: { text: "output" }, xaxis: { type: "category", title: { text: "output index" } } });
  }
}

function drawGraph(g) {
  // nodes at (position, module row), logits on the top row; the strongest edges as lines
  const modules = [...new Set(g.nodes.map((n) => n.module))];
  const row = (id) => (id.startsWith("logit:") ? modules.length : modules.indexOf(id.slice(0, id.lastIndexOf(":", id.lastIndexOf(":") - 1))));
  const pos = (id) => {
    const parts = id.split(":");
    return id.startsWith("logit:") ? Number(parts[1]) : Number(parts[parts.length - 2]) + 0.05 * (Number(parts[parts.length - 1]) % 7) - 0.15;
  };
  const top = Math.max(1e-12, ...g.edges.map((e) => Math.abs(e.value)));
  const lines = g.edges.map((e) => ({
    x: [pos(e.source), pos(e.target)], y: [row(e.source), row(e.target)], mode: "lines", hoverinfo: "skip", showlegend: false,
    line: { width: 0.5 + 4 * Math.abs(e.value) / top, color: e.value > 0 ? "rgba(31,119,180,0.5)" : "rgba(214,39,40,0.5)" },
  }));
  const used = new Set(g.edges.flatMap((e) => [e.source, e.target]));
  const nodes = g.nodes.filter((n) => used.has(n.id));
  const logits = g.logits.filter((l) => used.has(l.id));
  const points = {
    x: nodes.map((n) => pos(n.id)).concat(logits.map((l) => l.position)),
    y: nodes.map((n) => row(n.id)).concat(logits.map(() => modules.length)),
    text: nodes.map((n) => n.module + ":" + n.index + " @" + n.position + " ci " + n.ci.toFixed(2)).concat(logits.map((l) => "logit " + l.text + " @" + l.position)),
    customdata: nodes.map((n) => n.page || "").concat(logits.map(() => "")),
    mode: "markers", type: "scatter", hoverinfo: "text", showlegend: false, marker: { size: 8, color: "black" },
  };
  const tokens = g.tokens || g.ids.map(String);
  const div = document.getElementById("graph-plot");
  newPlot(div, lines.concat([points]), {
    title: { text: g.edges.length + " strongest edges" }, height: 120 + 40 * (modules.length + 1), margin: { l: 150, r: 20, t: 40, b: 60 },
    xaxis: { tickvals: tokens.map((_, i) => i), ticktext: tokens, title: { text: "position" } },
    yaxis: { tickvals: modules.map((_, i) => i).concat([modules.length]), ticktext: modules.concat(["logit"]) },
  });
  div.on("plotly_click", (ev) => {
    const page = ev.points[0] && ev.points[0].customdata;
    if (page) window.location.href = "/" + page;
  });
  div.dataset.nodes = String(nodes.length);
}

function shade(ctx) {
  return ctx.tokens.map((tok, i) => "<span class='tok" + (i === ctx.at ? " top" : "") + "' style='background: rgba(220, 60, 30, " +
    Math.max(0, Math.min(1, ctx.ci[i])).toFixed(3) + ")' title='CI " + ctx.ci[i] + "'>" + esc(tok) + "</span>").join("");
}

// The static report's search: live.search_harvest (what `spdkit serve` answers), over the
// harvest the report wrote into search_data.js.
function searchHarvest(harvested, query, limit) {
  query = query.trim();
  if (!query) throw new Error("type a string or token to search for");
  const found = [];
  for (const [name, entry] of Object.entries(harvested)) {
    const hits = entry.contexts.filter((c) => c.tokens.join("").includes(query) || c.tokens.join(" ").includes(query));
    if (!hits.length) continue;
    const onIt = hits.filter((c) => c.tokens[c.at].trim() === query).length;
    found.push({ name, page: entry.page, fires_on_query: onIt, n_contexts: hits.length, density: entry.density, contexts: hits.slice(0, 3) });
  }
  found.sort((a, b) => b.fires_on_query - a.fires_on_query || b.n_contexts - a.n_contexts || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return { query, n_subcomponents: found.length, results: found.slice(0, limit) };
}

function drawSearch(r) {
  const box = document.getElementById("search-result");
  const root = window.SPDKIT_HARVEST ? "" : "/";  // a page from disk links relatively
  const rows = r.results.map((s) => "<tr><td>" + (s.page ? "<a href='" + root + s.page + "'>" + esc(s.name) + "</a>" : esc(s.name)) +
    "</td><td>" + s.fires_on_query + "</td><td>" + s.n_contexts + "</td><td>" + s.density.toExponential(2) + "</td><td>" +
    s.contexts.map((c) => "<div class='context'>" + shade(c) + "</div>").join("") + "</td></tr>");
  box.innerHTML = "<p id='search-count'>" + r.n_subcomponents + " subcomponents with contexts containing <code>" + esc(r.query) + "</code></p>" +
    "<table class='kv'><tr><th>subcomponent</th><th>fires on it</th><th>contexts</th><th>density</th><th>where</th></tr>" + rows.join("") + "</table>";
}

window.setUpLive = function () {
  const formSearch = document.getElementById("form-search");
  if (formSearch) formSearch.addEventListener("submit", async (e) => {
    e.preventDefault();
    const err = document.getElementById("search-error");
    err.textContent = "";
    const query = document.getElementById("query").value;
    try {
      drawSearch(window.SPDKIT_HARVEST ? searchHarvest(window.SPDKIT_HARVEST, query, 50) : await post("/api/search", { query }));
    } catch (x) { err.textContent = x.message; }
  });
  const input = () => document.getElementById("input").value;
  const formIn = document.getElementById("form-input");
  if (!formIn) return;
  formIn.addEventListener("submit", async (e) => {
    e.preventDefault();
    const err = document.getElementById("ci-error");
    err.textContent = "";
    try { drawCI(await post("/api/ci", { input: input() })); } catch (x) { err.textContent = x.message; }
  });
  const formGraph = document.getElementById("form-graph");
  if (formGraph) formGraph.addEventListener("submit", async (e) => {
    e.preventDefault();
    const err = document.getElementById("graph-error");
    err.textContent = "";
    try { drawGraph(await post("/api/attribute", { input: input() })); } catch (x) { err.textContent = x.message; }
  });
  document.getElementById("form-ablate").addEventListener("submit", async (e) => {
    e.preventDefault();
    const err = document.getElementById("ablate-error");
    err.textContent = "";
    const sel = document.getElementById("clusters");
    const clusters = sel ? Array.from(sel.selectedOptions).map((o) => parseInt(o.value, 10)) : [];
    const subs = document.getElementById("subs").value.split(",").map((s) => s.trim()).filter((s) => s);
    try { drawAblation(await post("/api/ablate", { input: input(), clusters, subcomponents: subs })); } catch (x) { err.textContent = x.message; }
  });
};
