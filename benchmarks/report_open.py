"""Page weight of a run's report and the time to open it in headless Chromium.

    python benchmarks/report_open.py RUN_DIR [--screenshot docs/report_NAME.png] [--repeat 3]

Writes the report (`spdkit report`, timed), then: bytes of index.html and of everything it
loads (scripts, styles, figures), bytes of the whole report folder (every subcomponent page),
and the time from navigation to the load event and to the curves drawn by Plotly, in Debian's
Chromium through Playwright (the first open, then the median of --repeat more in fresh pages).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "spdkit", "report", str(args.run_dir), "--quiet"], check=True
    )
    write_s = time.perf_counter() - started
    report = args.run_dir / "report"
    index = report / "index.html"
    refs = {r for r in re.findall(r'(?:src|href)="([^"#]+)"', index.read_text())}
    own = ("sub/", "index.html")
    loaded = [report / r for r in refs if (report / r).is_file() and not r.startswith(own)]
    page_bytes = index.stat().st_size + sum(p.stat().st_size for p in loaded)
    folder_bytes = sum(p.stat().st_size for p in report.rglob("*") if p.is_file())
    n_pages = len(list((report / "sub").glob("*.html")))
    times = []
    with sync_playwright() as p:
        exe = shutil.which("chromium")
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        for i in range(1 + args.repeat):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            t0 = time.perf_counter()
            page.goto(index.as_uri())
            page.wait_for_load_state("load")
            t_load = time.perf_counter() - t0
            page.wait_for_selector("#plot-l0 .main-svg")
            t_drawn = time.perf_counter() - t0
            times.append((t_load, t_drawn))
            if i == 0 and args.screenshot:
                page.screenshot(path=str(args.screenshot), full_page=True)
            page.close()
        browser.close()
    later = times[1:] or times
    result = {
        "run": str(args.run_dir),
        "report_write_seconds": round(write_s, 2),
        "subcomponent_pages": n_pages,
        "index_page_weight_bytes": page_bytes,
        "report_folder_bytes": folder_bytes,
        "first_open": {"load_s": round(times[0][0], 3), "plots_drawn_s": round(times[0][1], 3)},
        "median_open": {
            "load_s": round(statistics.median(t[0] for t in later), 3),
            "plots_drawn_s": round(statistics.median(t[1] for t in later), 3),
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
