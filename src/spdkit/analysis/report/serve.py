"""`spdkit serve RUN_DIR`: the report's pages from memory, plus live tools, on 127.0.0.1 (Flask).

GET  /, /sub/<page>, /figures/<png>, static files: the pages `spdkit report` writes;
GET  /live: type an input, see CI per token per module, switch mechanisms off;
POST /api/ci      {"input": text}                             -> CI table (live.ci_table)
POST /api/attribute {"input": text}                         -> attribution graph (LMs)
GET  /search, POST /api/search {"query": text}              -> what fires on it (the harvest)
POST /api/ablate  {"input": text, "clusters": [id, ...],
                   "subcomponents": ["<module>:<index>", ...]} -> outputs (live.ablation)
Errors in a request come back as {"error": one line}: status 400 for a body that is not a
JSON object of the endpoint's fields (or holds a prompt longer than the target reads, see
`live.max_input_chars`), 413 for a body over MAX_BODY_BYTES. Nothing a client sends makes a 500.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, request, send_from_directory
from werkzeug.exceptions import RequestEntityTooLarge

from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.report import live
from spdkit.analysis.report.content import ReportContent
from spdkit.analysis.report.render import (
    environment,
    plotly_js,
    render_index,
    render_search,
    render_subcomponents,
    static_file,
)

MAX_BODY_BYTES = 64 * 1024  # a prompt of thousands of tokens and its options fit many times over
# each endpoint's fields: name -> (check, what it must be)
FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "ci": {"input": (lambda v: isinstance(v, str), "a string")},
    "attribute": {"input": (lambda v: isinstance(v, str), "a string")},
    "search": {"query": (lambda v: isinstance(v, str) and len(v) <= 200, "a string (≤ 200)")},
    "ablate": {
        "input": (lambda v: isinstance(v, str), "a string"),
        "clusters": (
            lambda v: (
                isinstance(v, list)
                and all(isinstance(k, int) and not isinstance(k, bool) for k in v)
            ),
            "a list of cluster ids (integers)",
        ),
        "subcomponents": (
            lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v),
            'a list of "<module>:<index>" strings',
        ),
    },
}


def parse_body(raw: bytes, fields: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """A request body as a JSON object of `fields`, each checked; a ValueError with one line
    saying what is wrong otherwise (not UTF-8, not JSON, nested too deep for the parser, not an
    object, an unknown field, a field of the wrong type)."""
    usage = "{" + ", ".join(f'"{name}": ...' for name in fields) + "}"
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except UnicodeDecodeError:
        raise ValueError("the request body is not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise ValueError(f"the request body is not JSON: send {usage}") from None
    if not isinstance(body, dict):
        raise ValueError(f"the request body must be a JSON object: {usage}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (allowed: {', '.join(fields)})")
    for name, (valid, what) in fields.items():
        if name in body and not valid(body[name]):
            raise ValueError(f"{name} must be {what}")
    return body


def create_app(decomp: Decomposed, content: ReportContent, run_dir: Path) -> Flask:
    app = Flask("spdkit.serve")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
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

    def _input(endpoint: str) -> tuple[dict[str, Any], Any]:
        body = parse_body(request.get_data(cache=False), FIELDS[endpoint])
        return body, live.parse_input(decomp, body.get("input", ""))

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_: RequestEntityTooLarge) -> tuple[Response, int]:
        return jsonify({"error": f"the request body is over {MAX_BODY_BYTES} bytes"}), 413

    @app.post("/api/ci")
    def _ci() -> Response:
        try:
            _, x = _input("ci")
            return jsonify(live.ci_table(decomp, x, content.threshold))
        except ValueError as err:
            return jsonify({"error": str(err)}), 400

    harvested = content.harvested

    @app.get("/search")
    def _search_page() -> str:
        return render_search(env, content, served=True)

    @app.post("/api/search")
    def _search() -> Response:
        try:
            body = parse_body(request.get_data(cache=False), FIELDS["search"])
            if not harvested:
                raise ValueError(f"no harvest in {run_dir}: run `spdkit harvest {run_dir}` first")
            return jsonify(live.search_harvest(harvested, body.get("query", ""), set(pages)))
        except ValueError as err:
            return jsonify({"error": str(err)}), 400

    @app.post("/api/attribute")
    def _attribute() -> Response:
        try:
            _, x = _input("attribute")
            if live.input_kind(decomp) != "text":
                raise ValueError("attribution graphs need a language model target")
            return jsonify(live.attribution_graph(decomp, x, content.threshold, set(pages)))
        except ValueError as err:
            return jsonify({"error": str(err)}), 400

    @app.post("/api/ablate")
    def _ablate() -> Response:
        try:
            body, x = _input("ablate")
            ids = body.get("clusters", [])
            known = {c.id for c in clusters}
            if any(k not in known for k in ids):
                raise ValueError(f"no cluster among {ids} in clusters.json")
            masks = live.ablation_masks(decomp, clusters, ids, body.get("subcomponents", []))
            return jsonify(live.ablation(decomp, x, masks))
        except ValueError as err:
            return jsonify({"error": str(err)}), 400

    return app


def serve(app: Flask, port: int) -> None:
    """Serve on 127.0.0.1:port until Ctrl-C (Werkzeug's threaded server: one user, local)."""
    app.run(host="127.0.0.1", port=port, threaded=False, use_reloader=False)
