"""What removing subcomponents does, as methods of a decomposition: `spdkit.Decomposition`
inherits them (`ablate`, `mechanism_score`, `specific_sets`), so the API's class stays one
screen per concern. They read only what `analysis.decomposed.Decomposed` names, plus the
decomposition's `clusters()`, `saved_clusters()` and `_decoder()`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spdkit.analysis import ablation, specific
from spdkit.analysis import mechanism_score as scoring
from spdkit.config import SPDConfig
from spdkit.method.model import ComponentModel
from spdkit.targets import target_kind


class RemovalMethods:
    """Mixin of `spdkit.Decomposition`: ablations, the mechanism score, specific sets."""

    model: ComponentModel
    config: SPDConfig
    run_dir: Path | None

    def ablate(
        self, items: Sequence[str], n: int = 256, seed: int | None = None, masks: str = "ci"
    ) -> dict[str, Any]:
        """What removing `items` (`cluster:<id>`, `specific:<group>` or `<module>:<index>`)
        costs, per position group (`planted_lm`: per task; other LMs: every position of n
        held-out sequences of draw `seed`; None: `ablation.measured_draw`, the fresh draw 1 for
        specific sets): next-token CE under the CI-gated ablation and the static weight edit,
        side by side (`spdkit.analysis.ablation`). `masks`: the CI-gated baseline, `ci`
        (m = g) or `rounded` (m = 1[g > eval.ci_threshold])."""
        seed = ablation.measured_draw(items, seed)
        sizes = {m: self.model.components(m).C for m in self.module_names}
        clusters = self.saved_clusters()
        off = ablation.parse_items(items, clusters, sizes, self.saved_specific(items))
        groups = ablation.position_groups(self, n, seed)
        chunk = self.config.eval.batch_size
        gate = ablation.Gate.named(masks, self.config.eval.ci_threshold)
        measured = ablation.measure(
            self.model, groups, off, self._decoder(), chunk=chunk, gate=gate
        )
        return {"off": off, "masks": gate.describe(), "seed": seed, "groups": measured}

    def mechanism_score(
        self,
        frac: float = 0.8,
        max_clusters: int = 8,
        n: int = 256,
        seed: int = 0,
        progress: bool = True,
        masks: str = "ci",
        removal: str = "gated",
    ) -> dict[str, Any]:
        """Per position group, the fewest clusters carrying ≥ `frac` of its loss, their
        selectivity, and the selective set where groups have a chance CE (mechanism_score);
        `masks` as in `ablate`; `removal` "gated" (CI-gated ablation) or "static" (the
        weight edit)."""
        if removal not in ("gated", "static"):
            raise ValueError(f"removal={removal!r}: use 'gated' or 'static'")
        groups = ablation.position_groups(self, n, seed)
        chance_ce = target_kind(self.config.target).chance_ce if self.config.target else None
        return scoring.mechanism_score(
            self.model,
            groups,
            self.clusters(),
            scoring.ScoreParams(frac, max_clusters),
            chance={g: chance_ce(self.config.target, g) for g in groups} if chance_ce else None,
            gate=ablation.Gate.named(masks, self.config.eval.ci_threshold),
            chunk=self.config.eval.batch_size,
            progress=progress,
            removal=removal,  # type: ignore[arg-type]
        )

    def specific_sets(
        self,
        n: int = 256,
        seed: int = 0,
        params: specific.SpecificParams | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Per position group (planted_lm: per task), the pieces that fire mostly on it,
        chosen on n sequences per group (draw `seed`) and measured on a fresh n (draw
        seed + 1) under the static edit and the CI-gated ablation (`analysis/specific.py`)."""
        chance_ce = target_kind(self.config.target).chance_ce if self.config.target else None
        select = ablation.position_groups(self, n, seed)
        if chance_ce is None or len(select) < 2:
            raise ValueError(
                "specific sets need position groups with a chance CE (planted_lm's tasks); "
                f"this run's groups: {', '.join(select)}"
            )
        result = specific.specific_sets(
            self.model,
            select,
            ablation.position_groups(self, n, seed + 1),
            {g: chance_ce(self.config.target, g) for g in select},
            self.config.eval.ci_threshold,
            params or specific.SpecificParams(),
            chunk=self.config.eval.batch_size,
            progress=progress,
        )
        result["params"] |= {"n": n, "select_seed": seed, "report_seed": seed + 1}
        return result

    def saved_specific(self, items: Sequence[str] | None = None) -> dict[str, list[str]] | None:
        """{group: items} of RUN_DIR/specific.json (`spdkit ablate --specific`), or None; given
        `items`, read only where one of them is `specific:<group>`, so a removal of clusters
        or pieces does not depend on that file."""
        wanted = items is None or ablation.names_specific(items)
        return specific.read_items(self.run_dir) if wanted and self.run_dir is not None else None
