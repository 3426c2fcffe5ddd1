"""The Python API: `decompose` any nn.Module, `load` a run directory, and `Decomposition`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spdkit.analysis import attribution, labels
from spdkit.analysis import harvest as harvest_module
from spdkit.analysis.attribution import AttributionParams
from spdkit.analysis.chat import ChatEndpoint
from spdkit.analysis.evaluation import evaluate
from spdkit.analysis.harvest import HarvestParams
from spdkit.analysis.mechanisms.clusters import (
    Cluster,
    Clustering,
    ClusterParams,
    cluster,
    mechanism_masks,
    read_clusters,
    write_clusters,
)
from spdkit.analysis.removals import RemovalMethods
from spdkit.config import SPDConfig
from spdkit.errors import ConfigError
from spdkit.method.measures import causal_importance
from spdkit.method.model import ComponentModel
from spdkit.progress import progress_bar
from spdkit.store import runs
from spdkit.store.restore import restore
from spdkit.targets import DataSource, eval_data_source, reports_lm, target_kind
from spdkit.training.loop import build_trainer, train_in_run_dir

log = logging.getLogger(__name__)


@dataclass
class Decomposition(RemovalMethods):
    """A trained decomposition: the component model, its config, and where it is stored."""

    model: ComponentModel
    config: SPDConfig
    run_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    data: DataSource | None = None  # the API's data; a config's target names its own

    def __repr__(self) -> str:
        return "\n".join(self.summary_lines())

    def _repr_html_(self) -> str:
        """A notebook cell shows the same lines as a small table."""
        import html

        lines = self.summary_lines()
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
            for k, _, v in (line.partition(": ") for line in lines[1:])
        )
        return f"<b>{html.escape(lines[0])}</b><table>{rows}</table>"

    def summary_lines(self) -> list[str]:
        """What this decomposition is, in a few lines: target, modules and C, CI function,
        schedule, where it is stored, and the evaluation's headline numbers if it has one."""
        config = self.config
        target = config.target.describe() if config.target is not None else "your model"
        modules = ", ".join(
            f"{n} (C {self.model.components(n).C})" for n in self.module_names[:6]
        ) + (f", ... {len(self.module_names) - 6} more" if len(self.module_names) > 6 else "")
        lines = [
            f"Decomposition of {target}",
            f"modules: {modules}",
            f"CI function: {config.ci_fn.kind}; steps {config.training.steps}, seed {config.seed}",
            f"run directory: {self.run_dir or 'none'}",
        ]
        l0 = self.summary.get("mean_ci_l0")
        if isinstance(l0, dict):
            lines.append(f"mean CI-L0: {sum(l0.values()):.3g} (all modules)")
        lm = self.summary.get("lm")
        if lm:
            lines.append(f"CE: target {lm['target']['ce']:.4f}, CI masks {lm['ci']['ce']:.4f} nats")
        match = self.summary.get("feature_match", {})
        if "mmcs" in match:
            lines.append(f"MMCS: {match['mmcs']:.4f} (ground truth: {match.get('ground_truth')})")
        return lines

    def evaluate(self, out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
        """The end-of-run metrics into summary.json and the figures into figures/ of
        `out_dir` (default: the run directory), as `spdkit run` writes them; returns the
        summary."""
        where = Path(out_dir) if out_dir is not None else self.run_dir
        if where is None:
            raise ValueError("this decomposition has no run directory: pass evaluate(out_dir=...)")
        where.mkdir(parents=True, exist_ok=True)
        self.summary = evaluate(self, self.run_dir or where, out_dir=where, progress=progress)
        return self.summary

    @property
    def module_names(self) -> list[str]:
        return self.model.module_names

    def causal_importance(self, x: Tensor, upper: bool = True) -> dict[str, Tensor]:
        """CI of every subcomponent on inputs x: {module: [..., C]}."""
        return causal_importance(self.model, x, upper=upper)

    def cluster(self, params: ClusterParams | None = None, progress: bool = True) -> Clustering:
        """Group the subcomponents into mechanisms (`spdkit cluster`: co-activations on the
        run's data, merged by description length); with a run directory, also writes
        clusters.json and figures/clusters.png there."""
        fig_dir = self.run_dir / "figures" if self.run_dir is not None else None
        found = cluster(self, params or ClusterParams(), fig_dir, progress)
        if self.run_dir is not None:
            write_clusters(self.run_dir, found)
        return found

    def clusters(self) -> list[Cluster]:
        """The mechanisms saved in RUN_DIR/clusters.json (`spdkit cluster` or `cluster()`)."""
        if self.run_dir is None:
            raise ValueError("this decomposition has no run directory: call cluster() instead")
        return read_clusters(self.run_dir).clusters

    def mechanism_masks(
        self, off: Sequence[int] = (), only: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """Masks [C] per module switching whole clusters (ids of `clusters()`) off, or only
        them on: `decomp.model(x, decomp.mechanism_masks(off=[3]))` runs the model without
        mechanism 3 (its members' rank-one weights removed)."""
        return mechanism_masks(self, self.clusters(), off, only)

    def attribute(
        self, prompt: str | Tensor, params: AttributionParams | None = None, progress: bool = False
    ) -> dict[str, Any]:
        """The attribution graph of one prompt (text through the target's encoder, or token
        ids [T] / [1, T]): edges gradient × activation between live subcomponents and into
        the logits (`spdkit.analysis.attribution`; the file format in the README)."""
        ids = self._prompt_ids(prompt)
        return attribution.prompt_graph(
            self.model, ids, params or self._attribution_params(), decode=self._decoder(),
            progress=progress,
        )  # fmt: skip

    def dataset_attributions(
        self,
        n_tokens: int,
        params: AttributionParams | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Edges between subcomponents averaged over ≥ n_tokens held-out tokens, streamed in
        batches of `batch_size` sequences (default: eval.batch_size, else 16)."""
        batches = self._held_out_batches(6000 + seed, batch_size)
        return attribution.dataset_attributions(
            self.model, batches, n_tokens, params or self._attribution_params(), progress
        )

    def harvest(
        self,
        params: HarvestParams | None = None,
        batch_size: int | None = None,
        out_dir: str | Path | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """One streaming pass over held-out tokens keeping, per subcomponent that fires, its
        density, mean CI, top and random contexts, associated tokens and co-firing neighbours
        (`spdkit.analysis.harvest`); written as Parquet into `out_dir` (default
        RUN_DIR/harvest/). Returns meta.json's content."""
        config = self.config
        params = params or HarvestParams(threshold=config.eval.ci_threshold)
        where = Path(out_dir) if out_dir is not None else None
        if where is None:
            if self.run_dir is None:
                raise ValueError("this decomposition has no run directory: pass harvest(out_dir=)")
            where = self.run_dir / harvest_module.HARVEST_DIR
        vocab = self._vocab_size()
        result = harvest_module.harvest(
            self.model,
            self._held_out_batches(7000 + params.seed, batch_size),
            vocab,
            params,
            chunk=config.eval.batch_size,
            progress=progress,
            clusters=self.saved_clusters(),
        )
        return harvest_module.write_harvest(result, where, params, self._decoder())

    def label(
        self,
        top: int | None = None,
        endpoint: ChatEndpoint | None = None,
        detect: int = 10,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Label the run's harvest (`spdkit.analysis.labels`) into harvest/labels.parquet:
        token-statistics labels; with `endpoint`, the model's labels and both labels'
        detection scores on `detect` firing and `detect` non-firing held-out contexts each."""
        if self.run_dir is None:
            raise ValueError("this decomposition has no run directory to label")
        if endpoint is None:
            return labels.write_labels(self.run_dir, top)

        def label_with(harvested, rows, journal):  # noqa: ANN001, ANN202
            contexts = {}
            if detect:  # from held-out batches of their own seed, apart from the harvest's
                decode = self._decoder() or (lambda ids: " ".join(map(str, ids)) + " ")
                clusters = {f"cluster:{c.id}": c.members for c in self.saved_clusters()}
                contexts = labels.held_out_contexts(
                    self.model, self._held_out_batches(8000, None), [r["name"] for r in rows],
                    clusters, decode, self.config.eval.ci_threshold, detect,
                )  # fmt: skip
            bar = progress_bar(len(rows), "label", progress)
            out = labels.endpoint_label_rows(
                harvested, rows, endpoint.complete, endpoint.model, contexts, journal, bar.update
            )
            bar.close()
            return out

        return labels.write_labels(self.run_dir, top, label_with)

    def _held_out_batches(self, offset: int, batch_size: int | None) -> Iterator[Tensor]:
        """Endless held-out batches of `batch_size` sequences (default eval.batch_size, else
        16) from the generator seeded config.seed + offset (each analysis its own stream)."""
        config = self.config
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(config.seed + offset)
        source = eval_data_source(config, self.data)
        size = batch_size or config.eval.batch_size or 16
        while True:
            yield source.sample(size, gen)

    def _vocab_size(self) -> int:
        """The target's token vocabulary (the embedding's rows)."""
        embed = next((m for m in self.model.target.modules() if isinstance(m, nn.Embedding)), None)
        if embed is None or not reports_lm(self.config.target):
            raise ValueError("harvest reads token ids: this run's target is not a language model")
        return embed.num_embeddings

    def _attribution_params(self) -> AttributionParams:
        return AttributionParams(ci_threshold=self.config.eval.ci_threshold)

    def _decoder(self) -> Callable[[list[int]], str] | None:
        target = self.config.target
        decoder = target_kind(target).decoder if target is not None else None
        return decoder(target) if decoder is not None else None

    def _prompt_ids(self, prompt: str | Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        if isinstance(prompt, Tensor):
            return prompt.reshape(1, -1).to(device)
        target = self.config.target
        encoder = target_kind(target).encoder if target is not None else None
        encode = encoder(target) if encoder is not None else None
        if encode is None:
            raise ValueError("this target has no text encoder: pass token ids as a tensor")
        ids = encode(prompt)
        seq_len = getattr(target, "seq_len", None)
        if not ids:
            raise ValueError("the prompt is empty")
        return torch.tensor([ids[-seq_len:] if seq_len else ids], device=device)

    def saved_clusters(self) -> list[Cluster]:
        """The clusters of RUN_DIR/clusters.json, or none when there is no such file."""
        if self.run_dir is None or not (self.run_dir / "clusters.json").exists():
            return []
        return self.clusters()

    def subcomponents(self, module: str) -> tuple[Tensor, Tensor]:
        """(U [d_out, C], V [C, d_in]) of one decomposed module."""
        if module not in self.model.module_names:
            raise KeyError(
                f"{module!r} is not decomposed (decomposed: {', '.join(self.module_names)})"
            )
        comps = self.model.components(module)
        return comps.U.detach(), comps.V.detach()


def decompose(
    model: nn.Module,
    data: DataSource,
    config: SPDConfig,
    run_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Decomposition:
    """Decompose the modules of `model` named by `config.modules` with SPD.

    `data.sample(batch_size, generator)` gives input batches. The model is frozen; its
    modules are never wrapped or renamed. With `run_dir`, config, target weights, metrics,
    checkpoints, components, summary.json and figures are written there (as `spdkit run`
    writes them). A bundled toy config's `target` section (`load_config("tms_5-2")`)
    describes a target spdkit would train, not `model`: it is dropped, saying so, and the
    config's losses and schedule apply to `model` with `data`.
    """
    config = for_user_model(config)
    if config.training.candidates > 1:
        raise ConfigError(
            "training.candidates > 1 is run by `spdkit run` (--target-factory for your own "
            "model); spdkit.decompose trains one start: set training.candidates=1"
        )
    trainer = build_trainer(model, data, config, device)
    path = Path(run_dir) if run_dir is not None else None
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        runs.save_config(path, config)
        runs.save_tensors(path / "target.safetensors", runs.target_state_dict(trainer.model))
    train_in_run_dir(trainer, path, progress)
    decomp = Decomposition(trainer.model, config, path, data=data)
    if path is not None:
        decomp.evaluate(progress=progress)
    return decomp


def for_user_model(config: SPDConfig) -> SPDConfig:
    """`config` without a target section that describes a toy target spdkit trains itself
    (the evaluation would otherwise feed that target's data to the user's model); a loaded
    target's section (`hf`, `python`: where the model came from) is kept."""
    if config.target is None or target_kind(config.target).loaded:
        return config
    log.warning(
        "decompose: ignoring the config's target section (kind %s): it describes a bundled "
        "target, and the model you passed is decomposed instead",
        config.target.kind,
    )
    return config.model_copy(update={"target": None})


def load(
    run_dir: str | Path,
    device: str = "cpu",
    target: nn.Module | None = None,
    data: DataSource | None = None,
) -> Decomposition:
    """Load a finished run directory or `spdkit export` folder (or its Hub id, from the local
    cache); safetensors only, nothing is unpickled.

    Bundled targets are rebuilt from target.json + target.safetensors; for your own model pass
    a fresh instance as `target` (its weights are replaced by the saved ones) and, for the
    analyses that draw inputs (`evaluate`, `cluster`), its `data`.
    """
    run_dir = runs.local_folder(run_dir)
    model, config, _ = restore(run_dir, device, target)
    summary = runs.read_summary(run_dir)
    return Decomposition(model, config, run_dir, summary, data=data)
