"""Which mechanism do a residual-MLP clustering's unlabelled pieces join, and why?

    python benchmarks/cluster_unlabelled_pieces.py RUN_DIR [--checkpoint] [--alpha 2]

The ground truth labels a W_in subcomponent "feature f" when positive one-hot inputs (the
verdict's probe) make it respond to f alone; a partly trained decomposition also holds live
pieces that respond to none of them ("alone": no known mechanism). For every such piece that the
clustering puts into a cluster of exactly one labelled feature f, this prints the feature whose
*negative* one-hot input (-`eval.one_hot_value`) gives it the largest CI, and that CI: when it
is f, the piece is the part of f's mechanism that only negative x_f uses, and the clustering
joined it to the right mechanism although the score counts it as an error.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

import spdkit
from spdkit.analysis.mechanisms.clusters import ClusterParams, cluster
from spdkit.analysis.mechanisms.ground_truth import true_mechanisms
from spdkit.method.measures import causal_importance, one_hot_inputs
from spdkit.pipeline.run import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", action="store_true")
    parser.add_argument("--alpha", type=float, default=ClusterParams().alpha)
    args = parser.parse_args()
    decomp = load_checkpoint(args.run)[0] if args.checkpoint else spdkit.load(args.run)
    target = decomp.config.target
    if target is None or target.kind != "resid_mlp":
        raise SystemExit(f"{args.run}: not a resid_mlp run (its pieces are labelled by one-hot CI)")
    found = cluster(decomp, replace(ClusterParams(), alpha=args.alpha), progress=False)
    live = [m for c in found.clusters for m in c.members]
    labels, _ = true_mechanisms(decomp, live)
    n, value = decomp.config.target.n_features, decomp.config.eval.one_hot_value
    device = next(decomp.model.parameters()).device
    with torch.no_grad():
        ci_neg = causal_importance(decomp.model, one_hot_inputs(n, -value, device))
    alone = sum(label.startswith("alone") for label in labels.values())
    attached, same = 0, 0
    for c in found.clusters:
        features = {labels[m] for m in c.members if labels[m].startswith("feature")}
        if len(features) != 1:
            continue
        f = int(features.pop().split()[1])
        for m in (m for m in c.members if labels[m].startswith("alone")):
            module, index = m.rsplit(":", 1)
            g = ci_neg[module][:, int(index)].cpu()
            attached += 1
            same += int(g.argmax()) == f
            print(
                f"{m}: with feature {f}; largest CI on a negative one-hot input: "
                f"feature {int(g.argmax())} ({g.max():.3f}); on -x_{f}: {g[f]:.3f}"
            )
    print(
        f"{alone} unlabelled live pieces; {attached} in a single-feature cluster, "
        f"{same} of them respond most to that feature's negative input"
    )


if __name__ == "__main__":
    main()
