"""What an analysis reads of a decomposition: a structural type that `spdkit.Decomposition`
satisfies. The analyses live below the API (the API's `Decomposition.evaluate()` and
`.cluster()` call them), so they name the API's type by its shape, not by importing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from spdkit.config import SPDConfig
from spdkit.method.model import ComponentModel
from spdkit.targets import DataSource


class Decomposed(Protocol):
    model: ComponentModel
    config: SPDConfig
    run_dir: Path | None
    summary: dict[str, Any]
    data: DataSource | None  # the API's data; None: the config's target names its own

    @property
    def module_names(self) -> list[str]: ...

    def subcomponents(self, module: str) -> tuple[Tensor, Tensor]:
        """(U [d_out, C], V [C, d_in]) of one decomposed module, detached."""
        ...
