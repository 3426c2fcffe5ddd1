"""`spdkit report` and `spdkit serve`: the pages, the live API, and a real headless Chromium
over real small run directories (screenshots into test-artifacts/report/)."""

from __future__ import annotations

import json
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


def test_report_and_serve_errors_are_one_line(tmp_path):
    for command in ("report", "serve"):
        result = runner.invoke(app, [command, str(tmp_path / "missing")])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
