"""`spdkit serve RUN_DIR`: the report's pages from memory, plus live tools, on 127.0.0.1 (Flask).

GET  /, /sub/<page>, /figures/<png>, static files: the pages `spdkit report` writes;
GET  /live: type an input, see CI per token per module, switch mechanisms off;
POST /api/ci      {"input": text}                             -> CI table (live.ci_table)
POST /api/ablate  {"input": text, "clusters": [id, ...],
                   "subcomponents": ["<module>:<index>", ...]} -> outputs (live.ablation)
Errors in a request come back as {"error": one line} with status 400.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, request, send_from_directory

from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.report import live
from spdkit.analysis.report.content import ReportContent
from spdkit.analysis.report.render import (
    environment,
    plotly_js,
    render_index,
    render_subcomponents,
    static_file,
)


def create_app(decomp: Decomposed, content: ReportContent, run_dir: Path) -> Flask:
    app = Flask("spdkit.serve")
    env = environment()
    pages = dict(render_subcomponents(env, content, served=True))
    index = render_index(env, content, served=True)
    clusters = content.clusters["clusters"] if content.clusters else []
    statics: dict[str, tuple[bytes, str]] = {
        "plotly.min.js": (plotly_js(), "text/javascript"),
        "report.js": (static_file("report.js"), "text/javascript"),
        "live.js": (static_file("live.js"), "text/javascript"),
        "report.css": (static_file("report.css"), "text/css"),
    }

    @app.get("/")
    @app.get("/index.html")
    def _index() -> str:
        return index

    @app.get("/sub/<page>")
    def _sub(page: str) -> str:
        html = pages.get(f"sub/{page}")
        if html is None:
            abort(404)
        return html

    @app.get("/figures/<name>")
    def _figure(name: str) -> Response:
        return send_from_directory(run_dir / "figures", name)

    @app.get("/<name>")
    def _static(name: str) -> Response:
        if name not in statics:
            abort(404)
        body, mime = statics[name]
        return Response(body, mimetype=mime)

    @app.get("/live")
    def _live() -> str:
        data = {
            "page": "live",
            "input_kind": live.input_kind(decomp),
            "n_features": getattr(decomp.config.target, "n_features", None),
            "clusters": [
                {"id": c.id, "size": len(c.members), "firing": c.firing_frequency} for c in clusters
            ],
        }
        return env.get_template("live.html").render(c=content, root="/", served=True, data=data)

    def _input() -> Any:
        body = request.get_json(silent=True) or {}
        return body, live.parse_input(decomp, str(body.get("input", "")))

    @app.post("/api/ci")
    def _ci() -> Response:
        try:
            _, x = _input()
            return jsonify(live.ci_table(decomp, x, content.threshold))
        except ValueError as err:
            return jsonify({"error": str(err)}), 400

    @app.post("/api/ablate")
    def _ablate() -> Response:
        try:
            body, x = _input()
            ids = [int(k) for k in body.get("clusters", [])]
            known = {c.id for c in clusters}
            if any(k not in known for k in ids):
                raise ValueError(f"no cluster among {ids} in clusters.json")
            masks = live.ablation_masks(decomp, clusters, ids, list(body.get("subcomponents", [])))
            return jsonify(live.ablation(decomp, x, masks))
        except ValueError as err:
            return jsonify({"error": str(err)}), 400

    return app


def serve(app: Flask, port: int) -> None:
    """Serve on 127.0.0.1:port until Ctrl-C (Werkzeug's threaded server: one user, local)."""
    app.run(host="127.0.0.1", port=port, threaded=False, use_reloader=False)
