"""Throughput of the streaming analyses against the target's own forward pass (issue: analysis at
scale): tokens per second of

- `forward`: the target alone (no_grad), the floor every analysis pays;
- `ci`: the target's forward with module inputs recorded plus the CI functions
  (`causal_importance`): what a harvest cannot avoid;
- `harvest`: `spdkit harvest`'s pass (`analysis.harvest.harvest`, nothing written);
- `attributions`: `spdkit attribute --dataset`'s pass (`analysis.attribution.dataset_attributions`),

all on the same pre-sampled held-out batches, each after one warm-up batch, and each as a ratio
of `forward`.

    python benchmarks/analysis_throughput.py RUN_DIR [--tokens 20000] [--batch-size 16]
        [--attribution-tokens 2000] [--profile harvest] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import torch

import spdkit
from spdkit.analysis import attribution
from spdkit.analysis import harvest as harvest_module
from spdkit.analysis.harvest import HarvestParams
from spdkit.method.measures import causal_importance
from spdkit.targets import eval_data_source


def timed(fn: Callable[[], object], profile: bool) -> float:
    if profile:
        prof = cProfile.Profile()
        prof.enable()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--attribution-tokens", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--profile", default="", help="cProfile this pass: harvest|attributions")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    decomp = spdkit.load(args.run_dir)
    model, config = decomp.model, decomp.config
    gen = torch.Generator().manual_seed(0)
    source = eval_data_source(config, decomp.data)
    warm = source.sample(args.batch_size, gen)
    batches = [warm]
    while sum(b.numel() for b in batches[1:]) < args.tokens:
        batches.append(source.sample(args.batch_size, gen))
    tokens = sum(b.numel() for b in batches[1:])
    vocab = decomp._vocab_size()
    params = HarvestParams(tokens=tokens, threshold=config.eval.ci_threshold)
    attribution_params = decomp._attribution_params()
    n_attr = max(1, -(-args.attribution_tokens // warm.numel()))

    def forward() -> None:
        with torch.no_grad():
            for ids in batches[1:]:
                model.target(ids)

    def ci() -> None:
        with torch.no_grad():
            for ids in batches[1:]:
                causal_importance(model, ids, chunk=config.eval.batch_size)

    def harvest() -> None:
        harvest_module.harvest(
            model, iter(batches[1:]), vocab, params, chunk=config.eval.batch_size, progress=False
        )

    def attributions() -> None:
        attribution.dataset_attributions(
            model, iter(batches[1 : 1 + n_attr]), n_attr * warm.numel(), attribution_params
        )

    with torch.no_grad():  # warm-up
        model.target(warm)
        causal_importance(model, warm)
    harvest_module.harvest(model, iter([warm]), vocab, HarvestParams(tokens=1), progress=False)
    if args.attribution_tokens:
        attribution.dataset_attributions(model, iter([warm]), 1, attribution_params)  # imports
    rows: dict[str, dict[str, float]] = {}
    passes = [("forward", forward, tokens), ("ci", ci, tokens), ("harvest", harvest, tokens)]
    if args.attribution_tokens:  # 0: skip (one backward per live target subcomponent)
        passes.append(("attributions", attributions, n_attr * warm.numel()))
    for name, fn, n in passes:
        seconds = timed(fn, args.profile == name)
        rows[name] = {"tokens": n, "seconds": round(seconds, 3), "tokens_per_s": n / seconds}
    base = rows["forward"]["tokens_per_s"]
    print(f"{args.run_dir}: {tokens} tokens, batches of {args.batch_size} × {warm.shape[1]}")
    print("| pass | tokens | s | tokens/s | ratio to forward |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        r["ratio_to_forward"] = r["tokens_per_s"] / base
        print(
            f"| {name} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['ratio_to_forward']:.3f} |"
        )
    result = {
        "run": str(args.run_dir),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "batch_size": args.batch_size,
        "seq_len": int(warm.shape[1]),
        "n_subcomponents": sum(model.components(m).C for m in model.module_names),
        "passes": rows,
    }
    out = args.out or Path(
        f"benchmarks/results/{datetime.date.today().isoformat()}_analysis_throughput.json"
    )
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
