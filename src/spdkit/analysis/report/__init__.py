"""The browsable report of a run (`spdkit report`) and its local server (`spdkit serve`).

content.py gathers what the pages show as plain data; render.py writes RUN_DIR/report/ from
Jinja2 templates (every plot drawn in the browser by Plotly from data inlined in the page, the
Plotly bundle copied next to the pages: no network); live.py computes the server's live
answers (CI of a typed input, the output with mechanisms switched off); serve.py is the Flask
app.
"""
