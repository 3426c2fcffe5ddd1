"""Time and peak memory of `spdkit attribute`, and how they grow with the live subcomponents.

    python benchmarks/attribute_cost.py RUN_DIR [--tokens 100000] [--out FILE.json]

RUN_DIR: a language-model run (the figures in docs/ are of tiny_lm with every matrix of both
blocks decomposed). One prompt (the held-out data's first sequence) at several CI thresholds
(fewer live nodes at higher thresholds), then the dataset aggregation over `--tokens` tokens at
the run's threshold. Each measurement runs in a child process of its own, so its peak resident
memory (ru_maxrss) is its own; the figure reported is that peak minus the child's resident
memory after loading the run (what the attribution itself adds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path


def _child(run_dir: str, kind: str, threshold: float, tokens: int, queue: mp.Queue) -> None:
    import torch

    import spdkit
    from spdkit.analysis.attribution import AttributionParams, prompt_graph
    from spdkit.targets import eval_data_source

    torch.set_num_threads(1)
    decomp = spdkit.load(run_dir)
    gen = torch.Generator().manual_seed(0)
    ids = eval_data_source(decomp.config).sample(1, gen)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = AttributionParams(ci_threshold=threshold)
    t0 = time.perf_counter()
    if kind == "prompt":
        graph = prompt_graph(decomp.model, ids, params)
        size = {"live_nodes": len(graph["nodes"]), "edges_kept": len(graph["edges"])}
    else:
        table = decomp.dataset_attributions(tokens, params, batch_size=16, progress=False)
        size = {"n_tokens": table["n_tokens"], "edges_kept": len(table["edges"])}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"kind": kind, "ci_threshold": threshold, "seconds": round(seconds, 2),
               "peak_added_mib": round((peak - base) / 1024, 1), **size})  # fmt: skip


def measure(run_dir: Path, kind: str, threshold: float, tokens: int = 0) -> dict:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(
        target=_child, args=(str(run_dir), kind, threshold, tokens, queue)
    )
    proc.start()
    result = queue.get()
    proc.join()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--thresholds", default="0.5,0.2,0.1,0.05,0.01")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [measure(args.run_dir, "prompt", float(t)) for t in args.thresholds.split(",")]
    import spdkit

    threshold = spdkit.load(args.run_dir).config.eval.ci_threshold
    rows.append(measure(args.run_dir, "dataset", threshold, args.tokens))
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run_dir), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
