"""`spdkit report` and `spdkit serve`: the pages, the live API, and a real headless Chromium
over real small run directories (screenshots into test-artifacts/report/)."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import spdkit
from spdkit.analysis.report import live
from spdkit.analysis.report.content import gather
from spdkit.analysis.report.serve import create_app
from spdkit.cli import app
from spdkit.config import load_config
from spdkit.pipeline.run import run_experiment

runner = CliRunner()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "report"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def tms_run(tiny_tms_run) -> Path:
    args = ["cluster", str(tiny_tms_run), "--samples", "2000", "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    return tiny_tms_run


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    small = {"target.train_steps": 40, "target.d_model": 32, "target.d_mlp": 64}
    config = load_config(
        "tiny_lm",
        {
            **small,
            "target.seq_len": 32,
            "steps": 30,
            "batch_size": 8,
            "log_every": 10,
            "modules": [{"pattern": "blocks.*.mlp.*", "C": 16}],
            "eval.n_eval_samples": 16,
            "eval.pgd_steps": [2],
        },
    )
    out = tmp_path_factory.mktemp("lm") / "lm_run"
    run_experiment(config, out, progress=False)
    from spdkit.analysis.harvest import HarvestParams
    from spdkit.analysis.labels import write_labels

    spdkit.load(out).harvest(HarvestParams(tokens=4000, top_k=4, random_k=3), progress=False)
    write_labels(out)  # `spdkit label`: token-statistics labels, shown on the pages
    return out


def test_report_writes_a_self_contained_page(tms_run):
    result = runner.invoke(app, ["report", str(tms_run), "--quiet"])
    assert result.exit_code == 0, result.output
    report = tms_run / "report"
    index = (report / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#]+)"', index):
        assert not ref.startswith(("http:", "https:", "//")), ref  # nothing from the network
        if not ref.startswith("data:"):
            assert (report / ref).exists(), ref  # every script, style, image, page next to it
    assert "clusters vs ground truth: ARI" in index and "linear1" in index
    # every headline number with what to read it against
    assert "paper Table 1: 1.000" in index and "1 = the true grouping, 0 = chance" in index
    pages = sorted((report / "sub").glob("*.html"))
    assert pages and all("page-data" in p.read_text() for p in pages)
    decomp = spdkit.load(tms_run)
    content = gather(decomp, tms_run)
    live_total = sum(len(s) for s in content.modules.values())
    assert len(pages) == live_total
    first = content.modules["linear1"][0]
    assert first.firing_frequency >= content.modules["linear1"][-1].firing_frequency
    assert sum(first.ci_histogram) == content.n_rows


def test_lm_report_has_contexts_with_ci_per_token(lm_run):
    decomp = spdkit.load(lm_run)
    content = gather(decomp, lm_run)
    sub = next(s for subs in content.modules.values() for s in subs)
    assert content.is_lm and sub.contexts
    ctx = sub.contexts[0]
    assert len(ctx["tokens"]) == len(ctx["ci"]) and 0 <= ctx["at"] < len(ctx["tokens"])
    assert ctx["ci"][ctx["at"]] == max(c["ci"][c["at"]] for c in sub.contexts)


def test_live_inputs_and_ablation(tms_run, lm_run):
    toy = spdkit.load(tms_run)
    x = live.parse_input(toy, "1, 0, 0, 0.5, 0")
    assert x.shape == (1, 5)
    with pytest.raises(ValueError, match="expected 5 numbers, got 2"):
        live.parse_input(toy, "1 2")
    clusters = toy.clusters()
    masks = live.ablation_masks(toy, clusters, [0], [])
    out = live.ablation(toy, x, masks)
    assert out["kind"] == "vector" and len(out["outputs"]["ablated"]) == 5
    with pytest.raises(ValueError, match="no subcomponent 'linear9:0'"):
        live.ablation_masks(toy, clusters, [], ["linear9:0"])
    lm = spdkit.load(lm_run)
    ids = live.parse_input(lm, "def main():")
    table = live.ci_table(lm, ids, 0.1)
    assert table["tokens"] == list("def␣main():")
    assert set(table["modules"]) == set(lm.module_names)
    res = live.ablation(lm, ids, live.ablation_masks(lm, [], [], [f"{lm.module_names[0]}:0"]))
    assert (
        res["kind"] == "text" and len(res["top"]["target"]) == 10 and res["kl_last"]["all_on"] >= 0
    )


def test_served_api_answers_and_rejects_bad_input(lm_run):
    decomp = spdkit.load(lm_run)
    client = create_app(decomp, gather(decomp, lm_run), lm_run).test_client()
    assert client.get("/").status_code == 200 and client.get("/live").status_code == 200
    assert client.get("/plotly.min.js").status_code == 200
    r = client.post("/api/ci", json={"input": "hello"})
    assert r.status_code == 200 and r.get_json()["tokens"] == list("hello")
    r = client.post("/api/ci", json={"input": ""})
    assert r.status_code == 400 and r.get_json()["error"] == "type a prompt first"
    r = client.post("/api/ablate", json={"input": "hi", "clusters": [3]})
    assert r.status_code == 400 and "no cluster" in r.get_json()["error"]


# --- a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(
            "headless browser tests need Debian's `chromium` package (apt-get install chromium)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_load_state("load")
    return page, errors


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_report_opens_in_chromium_and_a_row_opens_its_page(browser, tms_run):
    assert runner.invoke(app, ["report", str(tms_run), "--quiet"]).exit_code == 0
    page, errors = open_page(browser, (tms_run / "report" / "index.html").as_uri())
    page.wait_for_selector("#plot-losses .main-svg")  # Plotly drew the curves
    shot(page, "tms_index.png")
    table = page.locator("#table-linear1")
    header = table.locator("th", has_text="firing")
    header.click()
    header.click()  # descending
    values = [float(v) for v in table.locator("tbody tr td:nth-child(3)").all_inner_texts()]
    assert values == sorted(values, reverse=True)
    table.locator("tbody tr").first.locator("td").nth(1).click()  # a row (not its link)
    page.wait_for_url(re.compile(r".*/sub/linear1_\d+\.html"))
    page.wait_for_selector("#plot-hist .main-svg")
    shot(page, "tms_subcomponent.png")
    assert errors == [], errors


@pytest.fixture
def served(lm_run):
    from werkzeug.serving import make_server

    decomp = spdkit.load(lm_run)
    server = make_server("127.0.0.1", 0, create_app(decomp, gather(decomp, lm_run), lm_run))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_served_prompt_returns_ci_in_chromium(browser, served):
    page, errors = open_page(browser, served + "/live")
    page.fill("#input", "import os")
    page.click("#run-ci")
    page.wait_for_selector("#ci-plots .plot .main-svg")
    assert page.locator("#ci-plots .plot").count() == 4  # fc_in and fc_out of 2 blocks
    page.fill("#subs", "blocks.0.mlp.fc_in:0")
    page.click("#run-ablate")
    page.wait_for_selector("#kl-ablated")
    assert float(page.inner_text("#kl-ablated")) >= 0
    shot(page, "lm_live.png")
    page, more = open_page(browser, served + "/")
    page.wait_for_selector("#plot-l0 .main-svg")
    assert errors + more == [], errors + more
    text = json.loads(page.locator("#page-data").inner_text())
    assert text["page"] == "index"


def test_served_attribution_graph_draws_and_a_node_opens_its_page(browser, served):
    page, errors = open_page(browser, served + "/live")
    page.fill("#input", "import os")
    page.click("#run-graph")
    page.wait_for_selector("#graph-plot .main-svg")
    page.wait_for_function("document.getElementById('graph-plot').dataset.nodes !== undefined")
    assert int(page.get_attribute("#graph-plot", "data-nodes")) > 0
    shot(page, "lm_graph.png")
    index = page.evaluate(
        "document.getElementById('graph-plot').data.at(-1).customdata.findIndex((p) => p)"
    )
    assert index >= 0, "no drawn node has a subcomponent page"
    point = page.locator("#graph-plot .scatterlayer .trace").last.locator(".points path").nth(index)
    box = point.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_url(re.compile(r".*/sub/blocks\.\d\.mlp\.fc_(in|out)_\d+\.html"))
    assert errors == [], errors


def test_served_search_finds_what_fires_and_pages_show_the_harvest(browser, served):
    page, errors = open_page(browser, served + "/search")
    page.fill("#query", "e")
    page.click("#run-search")
    page.wait_for_selector("#search-count")
    assert int(page.inner_text("#search-count").split()[0]) > 0
    shot(page, "lm_search.png")
    page.locator("#search-result a").first.click()
    page.wait_for_url(re.compile(r".*/sub/blocks\.\d\.mlp\.fc_(in|out)_\d+\.html"))
    page.wait_for_selector("#harvest .harvest-top .context")
    assert page.locator("#stats-input tr").count() > 1  # a header and token rows
    assert "token statistics" in page.inner_text("#harvest-label")
    shot(page, "lm_subcomponent_harvest.png")
    assert errors == [], errors


def test_static_report_search_answers_as_the_server_does(browser, lm_run):
    """report/search.html searches the harvest in the browser, from disk: the same
    subcomponents, counts and order as `spdkit serve`'s /api/search (live.search_harvest)."""
    from spdkit.analysis.harvest import read_harvest

    assert runner.invoke(app, ["report", str(lm_run), "--quiet"]).exit_code == 0
    report = lm_run / "report"
    index = (report / "index.html").read_text()
    assert 'href="search.html"' in index
    pages = {p.relative_to(report).as_posix() for p in (report / "sub").glob("*.html")}
    for query in ("e", " t"):
        expected = live.search_harvest(read_harvest(lm_run), query, pages)
        page, errors = open_page(browser, (report / "search.html").as_uri())
        page.fill("#query", query)
        page.click("#run-search")
        page.wait_for_selector("#search-count")
        assert int(page.inner_text("#search-count").split()[0]) == expected["n_subcomponents"]
        names = page.locator("#search-result tr td:first-child").all_inner_texts()
        assert names == [r["name"] for r in expected["results"]]
        assert errors == [], errors
    page.locator("#search-result a").first.click()  # a relative link into the report
    page.wait_for_selector("#harvest .harvest-top .context")
    shot(page, "static_search_result_page.png")


def test_report_and_serve_errors_are_one_line(tmp_path):
    for command in ("report", "serve"):
        result = runner.invoke(app, [command, str(tmp_path / "missing")])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def _random_json(rng: random.Random, depth: int = 0):  # noqa: ANN202
    """A random JSON value: scalars, strings with any characters, lists and objects."""
    roll = rng.random()
    if depth > 3 or roll < 0.45:
        return rng.choice(
            [
                None,
                True,
                rng.randint(-(10**12), 10**12),
                rng.uniform(-1e6, 1e6),
                "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 40))),
                "hello",
                "",
            ]
        )
    if roll < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = ["input", "clusters", "subcomponents", "x", ""]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _bodies(rng: random.Random, n: int, query: bool = False) -> list[bytes]:
    """Malformed and half-right request bodies: random JSON values, objects of the right
    fields with wrong values, deep nesting, random bytes (not UTF-8), truncated JSON, a body
    over the size limit, and a few valid ones."""
    out = []
    for i in range(n):
        kind = i % 8
        if kind == 0:
            out.append(json.dumps(_random_json(rng)).encode())
        elif kind == 1:
            fields = {k: _random_json(rng) for k in ("input", "clusters", "subcomponents")}
            out.append(json.dumps({k: v for k, v in fields.items() if rng.random() < 0.7}).encode())
        elif kind == 2:
            d = rng.choice([100, 5000, 50000])
            out.append(("[" * d + "]" * d).encode() if rng.random() < 0.5 else b'{"a":' * d)
        elif kind == 3:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))))
        elif kind == 4:
            text = json.dumps({"input": "hello world", "clusters": [0]})
            out.append(text[: rng.randint(0, len(text) - 1)].encode())
        elif kind == 5:
            out.append(json.dumps({"input": "x" * rng.choice([10, 600, 70_000])}).encode())
        elif kind == 6:
            sub = rng.choice(["blocks.0.mlp.up:0", "nope:3", "blocks.0.mlp.up:99999", ":"])
            out.append(json.dumps({"input": "abc", "subcomponents": [sub]}).encode())
        else:
            out.append(json.dumps({"input": rng.choice(["hello", "ab", "é∑ \\n"])}).encode())
        if query and i % 4 == 0:  # the search endpoint's own field, right and wrong
            out[-1] = json.dumps({"query": rng.choice(["e", "", " ", "x" * 300, 7])}).encode()
    return out


def test_served_api_never_answers_a_malformed_body_with_a_server_error(served):
    """Hundreds of random bodies to every endpoint of a real server on 127.0.0.1: each gets
    200 or a one-line JSON error (400, or 413 over the size limit), never a 500, and the
    server still answers afterwards."""
    import urllib.error
    import urllib.request

    rng = random.Random(0)
    statuses: dict[int, int] = {}
    for endpoint, n in (
        ("/api/ci", 200),
        ("/api/ablate", 200),
        ("/api/attribute", 80),
        ("/api/search", 80),
    ):
        for body in _bodies(rng, n, query=endpoint == "/api/search"):
            req = urllib.request.Request(served + endpoint, data=body, method="POST")
            req.add_header("Content-Type", rng.choice(["application/json", "text/plain"]))
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    status, payload = r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                status, payload = err.code, json.loads(err.read())
                assert set(payload) == {"error"} and "\n" not in payload["error"], payload
            statuses[status] = statuses.get(status, 0) + 1
    print(f"{sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert set(statuses) <= {200, 400, 413}, statuses
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0 and statuses.get(413, 0) > 0
    with urllib.request.urlopen(served + "/", timeout=60) as r:
        assert r.status == 200


def test_served_toy_inputs_must_be_finite_and_short(tms_run):
    decomp = spdkit.load(tms_run)
    client = create_app(decomp, gather(decomp, tms_run), tms_run).test_client()
    n = decomp.config.target.n_features
    ok = client.post("/api/ci", json={"input": " ".join(["0.5"] * n)})
    assert ok.status_code == 200
    for text, says in [
        (" ".join(["nan"] * n), "finite"),
        (" ".join(["1e999"] * n), "finite"),
        ("0 " * 10_000, "characters"),
    ]:
        r = client.post("/api/ci", json={"input": text})
        assert r.status_code == 400 and says in r.get_json()["error"], r.get_json()
    r = client.post("/api/ablate", json={"input": "1 " * n, "clusters": [True]})
    assert r.status_code == 400 and "cluster ids" in r.get_json()["error"]
    r = client.post("/api/ci", data="not json", content_type="text/plain")
    assert r.status_code == 400 and "not JSON" in r.get_json()["error"]
