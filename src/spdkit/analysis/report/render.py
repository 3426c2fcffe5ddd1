"""Write RUN_DIR/report/: index.html, a page per live subcomponent (sub/<module>_<index>.html),
the run's figures, and the Plotly bundle, CSS and JS next to them. Opens with a double click:
no server, nothing fetched from the network."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from spdkit import files
from spdkit.analysis.report.content import HIST_BINS, TOP_ENTRIES, ReportContent, page_of
from spdkit.progress import progress_bar

Verdict = tuple[str, Any, str]  # (label, value, what to read it against)

SKIP = {  # long lists the summary holds for figures and scripts, not for reading
    "ci_one_hot",
    "top_contexts",
    "norms_sorted",
    "firing_frequency_sorted",
    "matched_subcomponent",
    "final_losses",
}


def fmt(v: Any) -> str:
    """Numbers with 4 significant digits; everything else as it is."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def alpha(ci: float) -> str:
    return f"{min(1.0, max(0.0, ci)):.3f}"


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("spdkit.analysis.report", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["alpha"] = alpha
    env.globals["skip"] = SKIP
    return env


def verdicts(summary: dict[str, Any], clusters: dict[str, Any] | None) -> list[Verdict]:
    """The reproduction verdicts a run has, as (label, value, what to read it against) rows:
    a number without its reference value says nothing to a reader."""
    out: list[Verdict] = []
    match = summary.get("feature_match")
    if match:
        paper = match.get("paper") or {}
        table = paper.get("table", "paper Table 1")
        out += [
            ("TMS MMCS", match["mmcs"], _paper(table, paper.get("mmcs"), "1 = every true column")),
            ("TMS ML2R", match["ml2r"], _paper(table, paper.get("ml2r"), "1 = no shrinkage")),
        ]
        if "ground_truth" in match:
            found = ", ".join(
                f"{n} {k}/{match['expected'][n]}" for n, k in match["non_negligible"].items()
            )
            out.append(
                (
                    "TMS ground truth",
                    match["ground_truth"],
                    f"MMCS ≥ 0.999 and one non-negligible piece per true term; found/expected: {found}",
                )
            )
    resid = summary.get("resid_mlp")
    if resid:
        out.append(
            (
                "resid_mlp ground truth",
                resid["verdict"]["ground_truth"],
                "one monosemantic W_in subcomponent per feature, W_out as expected",
            )
        )
        nc = resid.get("neuron_contributions")
        if nc:
            out.append(
                (
                    "neuron contributions r",
                    nc["pearson_r"],
                    "1 = each feature's W_in subcomponent drives the neurons the target's "
                    "feature does",
                )
            )
    for name, check in (summary.get("identity_check") or {}).items():
        out.append(
            (
                f"identity {name}: one dense group of rank d",
                check["one_dense_group_of_rank_d"],
                f"d = {check['d']}: {check['n_dense']} dense subcomponents",
            )
        )
    lm = summary.get("lm")
    if lm and "ci" in lm and "ce_gap_recovered" in lm["ci"]:
        out.append(
            (
                "CE gap recovered with CI masks",
                lm["ci"]["ce_gap_recovered"],
                f"1 = the target's CE {lm['target']['ce']:.4g}, 0 = every subcomponent off "
                f"({lm['zero']['ce']:.4g})",
            )
        )
    if clusters and clusters.get("ground_truth"):
        gt = clusters["ground_truth"]
        out.append(
            (
                "clusters vs ground truth: ARI",
                gt["ari"],
                f"1 = the true grouping, 0 = chance; {gt['n_mechanisms_found']} found, "
                f"{gt['n_mechanisms_expected']} expected",
            )
        )
    return out


def _paper(table: str, value: float | None, meaning: str) -> str:
    return meaning if value is None else f"{table}: {value:.3f}; {meaning}"


def static_file(name: str) -> bytes:
    return resources.files("spdkit.analysis.report").joinpath("static", name).read_bytes()


def plotly_js() -> bytes:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode()


def render_index(env: Environment, c: ReportContent, served: bool = False) -> str:
    steps = c.metrics[-1]["step"] if c.metrics else 0
    loss_keys = sorted(
        {k for m in c.metrics for k in m if k not in ("step", "lr") and not k.startswith("l0/")}
    )
    l0_keys = sorted({k for m in c.metrics for k in m if k.startswith("l0/")})
    metrics = {k: v for k, v in c.summary.items() if k not in ("timing", "modules")}
    pages = {s.name: s.page for subs in c.modules.values() for s in subs}
    data = {"page": "index", "metrics": c.metrics, "loss_keys": loss_keys, "l0_keys": l0_keys}
    return env.get_template("index.html").render(
        c=c,
        root="",
        served=served,
        steps=steps,
        metrics=metrics,
        verdicts=verdicts(c.summary, c.clusters),
        figures=[f"figures/{f.name}" for f in c.figures],
        pages=pages,
        data=data,
    )


def render_subcomponents(
    env: Environment, c: ReportContent, served: bool = False
) -> Iterator[tuple[str, str]]:
    """(relative path, html) of every subcomponent page."""
    template = env.get_template("subcomponent.html")
    pages = {s.name: s.page for subs in c.modules.values() for s in subs}
    members = {}
    if c.clusters:
        members = {cl.id: cl.members for cl in c.clusters["clusters"]}
    for subs in c.modules.values():
        for s in subs:
            data = {
                "page": "subcomponent",
                "u": s.u,
                "v": s.v,
                "u_top": len(s.u["index"]) == TOP_ENTRIES,
                "v_top": len(s.v["index"]) == TOP_ENTRIES,
                "bins": HIST_BINS,
                "hist": s.ci_histogram,
                "n_rows": c.n_rows,
                "one_hot": s.one_hot_ci,
            }
            cluster_members = members.get(s.cluster, []) if s.cluster is not None else []
            html = template.render(
                c=c,
                s=s,
                root="../",
                served=served,
                pages=pages,
                cluster_members=cluster_members[:40],
                data=data,
            )
            yield s.page, html


def write_report(c: ReportContent, run_dir: Path, progress: bool = True) -> Path:
    """RUN_DIR/report/index.html and everything it needs, next to it. Returns its path."""
    out = run_dir / "report"
    (out / "sub").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    env = environment()
    files.atomic_write_bytes(out / "plotly.min.js", plotly_js())
    for name in ("report.css", "report.js"):
        files.atomic_write_bytes(out / name, static_file(name))
    for fig in c.figures:
        files.atomic_copy(fig, out / "figures" / fig.name)
    n_pages = sum(len(s) for s in c.modules.values())
    bar = progress_bar(n_pages, "report pages", progress)
    for path, html in render_subcomponents(env, c):
        files.atomic_write_text(out / path, html)
        bar.update(1)
    bar.close()
    if c.harvested:  # the dataset search, searched in the browser (no server needed)
        files.atomic_write_bytes(out / "live.js", static_file("live.js"))
        files.atomic_write_text(out / SEARCH_DATA, search_data_js(c.harvested, pages_of(c)))
        files.atomic_write_text(out / "search.html", render_search(env, c, served=False))
    index = out / "index.html"
    files.atomic_write_text(index, render_index(env, c))
    return index


SEARCH_DATA = "search_data.js"


def pages_of(c: ReportContent) -> set[str]:
    return {s.page for subs in c.modules.values() for s in subs}


def search_data_js(harvested: dict[str, dict[str, Any]], pages: set[str]) -> str:
    """The harvest's kept contexts as a script (`window.SPDKIT_HARVEST = {name: {density,
    page, contexts}}`): a page opened from disk may load scripts but not fetch JSON, so this
    is how the static report's search reads them. Contexts: tokens, CI per token, the firing
    token's index, as `spdkit serve` searches them (`live.search_harvest`)."""
    data = {}
    for name, entry in harvested.items():
        page = page_of(name)
        data[name] = {
            "density": entry["density"],
            "page": page if page in pages else None,
            "contexts": entry["top"] + entry["random"],
        }
    return "window.SPDKIT_HARVEST = " + json.dumps(data, separators=(",", ":")) + ";\n"


def render_search(env: Environment, c: ReportContent, served: bool) -> str:
    data = {"page": "search", "harvested": len(c.harvested), "static": not served}
    root = "/" if served else ""
    return env.get_template("search.html").render(c=c, root=root, served=served, data=data)
