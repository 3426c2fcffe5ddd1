"""Mechanisms of a decomposition: `spdkit cluster`, RUN_DIR/clusters.json, and masks that
switch whole mechanisms on or off.

clusters.json (a public contract, README "Run directory"):
    {"method": "mdl-greedy", "params": {...},
     "clusters": [{"id": 0, "members": ["<module>:<index>", ...], "firing_frequency": f}, ...],
     "dead": ["<module>:<index>", ...], ...}
<index> is the subcomponent's column of <module>.U and row of <module>.V. Clusters are ordered
by size, then firing frequency. Further top-level keys (n_samples, description_length_bits,
ground_truth, cost) are informative; readers ignore keys they do not know.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from spdkit import files
from spdkit.analysis import plots
from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.mechanisms.firings import Firings, gather_firings
from spdkit.analysis.mechanisms.ground_truth import score, true_mechanisms
from spdkit.analysis.mechanisms.merge import merge_greedy
from spdkit.progress import progress_bar
from spdkit.store import atomic
from spdkit.targets import eval_data_source

METHOD = "mdl-greedy"
PLOT_MAX_SUBCOMPONENTS = 2000  # clusters.png shows the first this many, in cluster order
FILE = "clusters.json"


@dataclass(frozen=True)
class ClusterParams:
    """samples: CI rows to gather (toy inputs, LM token positions); threshold: τ of g = 1[CI > τ];
    alpha: bits per rank-one piece of a firing group (higher: fewer, tighter merges); min_count:
    a subcomponent firing on fewer samples is dead; seed: of the data drawn; unit (LMs): a
    sample is a token `position`, or a `sequence` (a piece fires on a sequence if it fires on
    at least `sequence_rate` of its positions, anywhere at 0: pieces that serve one kind of
    sequence, e.g. one planted task, co-fire across it even where they work at different
    positions, and a rate keeps a piece that fires once in other sequences out of theirs)."""

    samples: int = 20000
    threshold: float = 0.1
    alpha: float = 2.0
    min_count: int = 1
    seed: int = 0
    unit: Literal["position", "sequence"] = "position"
    sequence_rate: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "samples": (self.samples >= 1, "≥ 1"),
            "threshold": (0 <= self.threshold < 1, "in [0, 1): CI above 1 is only the leak"),
            "alpha": (self.alpha >= 0, "≥ 0"),
            "min_count": (self.min_count >= 1, "≥ 1"),
            "unit": (self.unit in ("position", "sequence"), "position or sequence"),
            "sequence_rate": (0 <= self.sequence_rate <= 1, "in [0, 1]"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"cluster {name} = {getattr(self, name)}: must be {allowed}")


@dataclass(frozen=True)
class Cluster:
    id: int
    members: list[str]  # "<module>:<index>"
    firing_frequency: float

    def indices(self) -> dict[str, list[int]]:
        """{module: subcomponent indices} of the members."""
        out: dict[str, list[int]] = {}
        for name in self.members:
            module, index = name.rsplit(":", 1)
            out.setdefault(module, []).append(int(index))
        return out

    def summary_line(self) -> str:
        spans = Counter(name.rsplit(":", 1)[0] for name in self.members)
        modules = ", ".join(f"{m} ×{n}" for m, n in spans.items())
        size = f"{len(self.members)} member{'s' if len(self.members) > 1 else ''}"
        return f"cluster {self.id:>4}: {size:<11} firing {self.firing_frequency:.4f}  {modules}"


@dataclass
class Clustering:
    params: ClusterParams
    clusters: list[Cluster]
    dead: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # n_samples, costs, ground truth
    method: str = METHOD

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": asdict(self.params),
            "clusters": [asdict(c) for c in self.clusters],
            "dead": self.dead,
            **self.info,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Clustering:
        params = ClusterParams(
            **{k: v for k, v in data["params"].items() if k in ClusterParams.__annotations__}
        )
        clusters = [
            Cluster(int(c["id"]), list(c["members"]), float(c.get("firing_frequency", 0.0)))
            for c in data["clusters"]
        ]
        known = {"method", "params", "clusters", "dead"}
        info = {k: v for k, v in data.items() if k not in known}
        return cls(params, clusters, list(data["dead"]), info, data["method"])


def gather(decomp: Decomposed, params: ClusterParams, progress: bool = True) -> Firings:
    """The firing record `cluster` works from: `params.samples` CI rows of the run's held-out
    data (seed: the run's + 4000 + params.seed), thresholded at `params.threshold`."""
    config, model = decomp.config, decomp.model
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(config.seed + 4000 + params.seed)
    return gather_firings(
        model,
        eval_data_source(config, decomp.data),
        params.samples,
        params.threshold,
        config.eval.batch_size or config.eval.n_eval_samples,
        gen,
        progress,
        per_sequence=params.unit == "sequence",
        sequence_rate=params.sequence_rate,
    )


def cluster(
    decomp: Decomposed,
    params: ClusterParams = ClusterParams(),  # noqa: B008 (frozen dataclass)
    fig_dir: Path | None = None,
    progress: bool = True,
) -> Clustering:
    """Gather co-activations on the run's (held-out) data, merge by description length, score
    against the toy target's known mechanisms, and draw the ordered co-activation matrix."""
    started = time.perf_counter()
    firings = gather(decomp, params, progress)
    gathered = time.perf_counter()
    counts = firings.counts()
    live_ids = np.flatnonzero(counts >= params.min_count)
    dead = [firings.names[i] for i in np.flatnonzero(counts < params.min_count)]
    if len(live_ids) == 0:
        raise ValueError(
            f"all {len(dead)} subcomponents fire on fewer than {params.min_count} of "
            f"{firings.n_samples} samples at τ = {params.threshold}: nothing to cluster"
        )
    live = firings.restricted(live_ids)
    bar = progress_bar(max(1, len(live_ids) - 1), "merging", progress)
    merges = merge_greedy(live, params.alpha, on_merge=lambda k: bar.update(1))
    bar.close()
    merged = time.perf_counter()
    groups = [
        ([live.names[i] for i in g], s) for g, s in zip(merges.groups, merges.fired, strict=True)
    ]
    groups.sort(key=lambda gs: (-len(gs[0]), -gs[1], gs[0][0]))
    clusters = [
        Cluster(i, members, fired / live.n_samples) for i, (members, fired) in enumerate(groups)
    ]
    info: dict[str, Any] = {
        "n_samples": live.n_samples,
        "n_live": len(live_ids),
        "description_length_bits": {
            "singletons": merges.cost_singletons,
            "clustered": merges.cost_final,
        },
        "cost": _cost(firings, gathered - started, merged - gathered),
    }
    truth = true_mechanisms(decomp, live.names)
    if truth is not None:
        labels, expected = truth
        info["ground_truth"] = score(labels, [c.members for c in clusters], expected)
    if fig_dir is not None:
        plot_clusters(live, clusters, fig_dir / "clusters.png")
    return Clustering(params, clusters, dead, info)


def plot_clusters(live: Firings, clusters: list[Cluster], path: Path) -> None:
    """The co-activation matrix ordered by cluster (largest first), of the first
    PLOT_MAX_SUBCOMPONENTS subcomponents in that order: the figure and its [m, m] counts stay
    readable and small however many are live."""
    position = {name: i for i, name in enumerate(live.names)}
    sizes, ordered = [], []
    for c in clusters:
        take = c.members[: PLOT_MAX_SUBCOMPONENTS - len(ordered)]
        if not take:
            break
        sizes.append(len(take))
        ordered += take
    sub = live.restricted(np.array(sorted(position[n] for n in ordered)))
    at = {name: i for i, name in enumerate(sub.names)}
    order = [at[n] for n in ordered]
    plots.plot_coactivation(sub.pair_counts()[order][:, order], sizes, ordered, path)


def _cost(firings: Firings, pass_s: float, merge_s: float) -> dict[str, Any]:
    """What `spdkit cluster` held and took: the firing record (the merge holds it and O(live)
    more, `merge.py`), the process's peak resident memory, the seconds of each pass."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return {
        "firings": int(len(firings.fired)),
        "record_bytes": firings.nbytes(),
        "peak_rss_bytes": int(peak_bytes),
        "gather_seconds": round(pass_s, 3),
        "merge_seconds": round(merge_s, 3),
    }


def write_clusters(run_dir: Path, clustering: Clustering) -> Path:
    path = run_dir / FILE
    files.atomic_write_text(path, json.dumps(clustering.to_json(), indent=1) + "\n")
    return path


def read_clusters(run_dir: Path) -> Clustering:
    path = run_dir / FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `spdkit cluster {run_dir}` first")
    try:
        return Clustering.from_json(atomic.read_json_object(path))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise atomic.RunDirError(
            f"{path}: not a clusters.json ({type(err).__name__}: {err})"
        ) from err


def mechanism_masks(
    decomp: Decomposed,
    clusters: list[Cluster],
    off: list[int] | tuple[int, ...] = (),
    only: list[int] | tuple[int, ...] | None = None,
) -> dict[str, Tensor]:
    """Masks [C] per module for `decomp.model(x, masks)`: every subcomponent on except the
    members of the clusters in `off` (ablation), or, with `only`, just the members of those
    clusters on (dead subcomponents included in "every" / excluded by "only")."""
    if only is not None and off:
        raise ValueError("give either `off` (clusters to switch off) or `only`, not both")
    by_id = {c.id: c for c in clusters}
    unknown = [k for k in [*off, *(only or [])] if k not in by_id]
    if unknown:
        raise KeyError(f"no cluster with id {unknown[0]} (ids 0..{len(clusters) - 1})")
    masks = decomp.model.ones_masks()
    for k in [*off, *(only or [])]:
        for module, indices in by_id[k].indices().items():
            if module not in masks or max(indices) >= len(masks[module]):
                raise ValueError(f"cluster {k}: {module}:{max(indices)} is not in this model")
    if only is not None:
        masks = {m: torch.zeros_like(v) for m, v in masks.items()}
    for k, value in [(k, 0.0) for k in off] + [(k, 1.0) for k in only or []]:
        for module, indices in by_id[k].indices().items():
            masks[module][indices] = value
    return masks
