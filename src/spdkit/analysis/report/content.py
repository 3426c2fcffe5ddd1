"""What a run's report shows, gathered from its run directory as plain data (no HTML here).

Per module, every live subcomponent (CI > τ on at least one row of the report's sample of the
run's held-out data): its norm ‖U_c V_cᵀ‖_F, firing frequency (share of rows with CI > τ),
mean CI, cluster (from clusters.json when it exists), a CI histogram, its U and V (all entries
for short vectors, the largest by magnitude otherwise), CI on one-hot inputs (toy targets with
features) and, for language models, the contexts where its CI is highest with the CI of every
token of the context, and what `spdkit harvest` kept of it when the run has a harvest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.harvest import read_harvest
from spdkit.analysis.mechanisms.clusters import FILE as CLUSTERS_FILE
from spdkit.analysis.mechanisms.clusters import read_clusters
from spdkit.method.measures import causal_importance, one_hot_inputs, subcomponent_norms
from spdkit.store import runs
from spdkit.targets import eval_data_source, reports_lm, target_kind

HIST_BINS = [round(0.05 * i, 2) for i in range(22)]  # 0 .. 1.05: the upper CI leaks above 1
TOP_ENTRIES = 24  # U / V entries shown when a vector is longer than this
CONTEXT_WIDTH = 16  # tokens before the top position (and 4 after)
N_CONTEXTS = 6


def page_of(name: str) -> str:
    """The report page of subcomponent "<module>:<index>": sub/<module>_<index>.html."""
    module, _, index = name.rpartition(":")
    return f"sub/{module}_{index}.html"


@dataclass
class Subcomponent:
    module: str
    index: int
    norm: float
    firing_frequency: float
    mean_ci: float
    cluster: int | None
    ci_histogram: list[int]  # counts in HIST_BINS
    u: dict[str, list]  # {"index": [...], "value": [...]}
    v: dict[str, list]
    one_hot_ci: list[float] | None = None
    contexts: list[dict[str, Any]] = field(default_factory=list)  # LM: tokens + CI per token
    harvest: dict[str, Any] | None = None  # from RUN_DIR/harvest/ (`spdkit harvest`), if any

    @property
    def name(self) -> str:
        return f"{self.module}:{self.index}"

    @property
    def page(self) -> str:
        return page_of(self.name)


@dataclass
class ReportContent:
    title: str
    target: str
    config_yaml: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    figures: list[Path]
    modules: dict[str, list[Subcomponent]]  # live subcomponents, by module
    n_subcomponents: dict[str, int]
    n_rows: int
    threshold: float
    is_lm: bool
    clusters: dict[str, Any] | None
    harvested: dict[str, dict[str, Any]] = field(default_factory=dict)  # read_harvest's


def vector_entries(v: Tensor) -> dict[str, list]:
    """All entries of a short vector, else the TOP_ENTRIES largest by magnitude (by index)."""
    v = v.detach().float().cpu()
    if v.numel() <= TOP_ENTRIES:
        idx = torch.arange(v.numel())
    else:
        idx = v.abs().topk(TOP_ENTRIES).indices.sort().values
    return {"index": idx.tolist(), "value": [round(x, 5) for x in v[idx].tolist()]}


def gather(decomp: Decomposed, run_dir: Path, n_rows: int | None = None) -> ReportContent:
    """Everything the report shows. `n_rows`: data rows for the CI statistics (default: the
    evaluation's n_eval_samples)."""
    config, model = decomp.config, decomp.model
    threshold = config.eval.ci_threshold
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(config.seed + 5000)
    x = eval_data_source(config, decomp.data).sample(n_rows or config.eval.n_eval_samples, gen)
    ci = causal_importance(model, x, chunk=config.eval.batch_size)
    is_lm = reports_lm(config.target)
    decode = None
    if is_lm and config.target is not None and target_kind(config.target).decoder is not None:
        decode = target_kind(config.target).decoder(config.target)
    one_hot = None
    if config.target is not None and hasattr(config.target, "n_features"):
        one_hot = causal_importance(
            model, one_hot_inputs(config.target.n_features, config.eval.one_hot_value, device)
        )
    cluster_of: dict[str, int] = {}
    clusters = None
    if (run_dir / CLUSTERS_FILE).exists():
        found = read_clusters(run_dir)
        cluster_of = {m: c.id for c in found.clusters for m in c.members}
        clusters = {"clusters": found.clusters, "dead": found.dead, **found.info}
    harvested = read_harvest(run_dir) or {}
    modules, n_subs = {}, {}
    for name in model.module_names:
        U, V = decomp.subcomponents(name)
        g = ci[name].detach().float().cpu()
        flat = g.reshape(-1, g.shape[-1])  # [rows, C]
        fires = (flat > threshold).float().mean(0)
        norms = subcomponent_norms(U, V)
        n_subs[name] = U.shape[1]
        subs = []
        for c in torch.argsort(fires, descending=True).tolist():
            if fires[c] == 0:
                break
            hist = torch.histogram(flat[:, c].clamp(0, 1.0499), torch.tensor(HIST_BINS)).hist
            sub = Subcomponent(
                module=name,
                index=c,
                norm=round(float(norms[c]), 5),
                firing_frequency=round(float(fires[c]), 5),
                mean_ci=round(float(flat[:, c].mean()), 5),
                cluster=cluster_of.get(f"{name}:{c}"),
                ci_histogram=[int(h) for h in hist.tolist()],
                u=vector_entries(U[:, c]),
                v=vector_entries(V[c]),
                one_hot_ci=(
                    [round(v, 4) for v in one_hot[name][:, c].tolist()] if one_hot else None
                ),
            )
            if decode is not None:
                sub.contexts = highest_ci_contexts(g[..., c], x.cpu(), decode)
            sub.harvest = harvested.get(sub.name)
            subs.append(sub)
        modules[name] = subs
    return ReportContent(
        title=run_dir.resolve().name,
        target=config.target.describe() if config.target is not None else "(your model)",
        config_yaml=(run_dir / "config.yaml").read_text(),
        summary=decomp.summary or runs.read_summary(run_dir),
        metrics=runs.read_metrics(run_dir),
        figures=sorted((run_dir / "figures").glob("*.png")),
        modules=modules,
        n_subcomponents=n_subs,
        n_rows=int(x.shape[0]),
        threshold=threshold,
        is_lm=is_lm,
        clusters=clusters,
        harvested=harvested,
    )


def highest_ci_contexts(
    ci: Tensor, ids: Tensor, decode: Callable[[list[int]], str]
) -> list[dict[str, Any]]:
    """The N_CONTEXTS positions where this subcomponent's CI [B, T] is highest: the tokens
    around each (CONTEXT_WIDTH before, 4 after) with its CI on every one of them."""
    B, T = ci.shape
    out = []
    for i in ci.reshape(-1).topk(min(N_CONTEXTS, B * T)).indices.tolist():
        b, t = divmod(i, T)
        lo, hi = max(0, t - CONTEXT_WIDTH), min(T, t + 5)
        out.append(
            {
                "tokens": [decode([int(tok)]) for tok in ids[b, lo:hi].tolist()],
                "ci": [round(v, 3) for v in ci[b, lo:hi].tolist()],
                "at": t - lo,
            }
        )
    return out
