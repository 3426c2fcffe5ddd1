"""`spdkit export RUN_DIR OUT`: a finished decomposition as a self-describing folder that can be
pushed to the Hugging Face Hub as is, and that `spdkit.load(OUT)` (or its Hub id, from the
local cache) loads back.

    README.md                 the model card: YAML metadata (library, tags, base_model and its
                              revision, license where the target states one) and what a reader
                              needs: method, objective, C per module, steps, headline numbers
    config.yaml               the resolved config
    components.safetensors    U, V and the CI function
    target.json               how to rebuild the target; for a Hugging Face target whose weights
                              are not copied, "weights": "referenced" (loaded from
                              target.path: a Hub id in the cache, or a local folder)
    target.safetensors        the target's weights (bundled and factory targets; a Hugging Face
                              target only with `with_target`)
    summary.json, clusters.json, figures/*.png   when the run has them

Nothing is uploaded; the card says how (the Hub's own client).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from spdkit import files
from spdkit.config import SPDConfig
from spdkit.errors import RunDirError
from spdkit.store import atomic, runs
from spdkit.targets import hf

FIGURES = ("losses.png", "l0.png", "ci_histograms.png", "planted_tasks.png", "clusters.png")


def export_run(run_dir: Path, out: Path, with_target: bool = False) -> Path:
    """Write the export folder of finished run `run_dir` into new folder `out`."""
    run_dir, out = Path(run_dir), Path(out)
    config = runs.load_run_config(run_dir)
    if not (run_dir / "components.safetensors").is_file():
        raise RunDirError(f"{run_dir}: not finished (no components.safetensors): nothing to export")
    if config.target is None:
        raise RunDirError(
            f"{run_dir}: a decomposition of a model passed to spdkit.decompose; an export needs "
            "a target the folder can rebuild (bundled, --target-factory or --target-hf)"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "components.safetensors", "summary.json", "clusters.json"):
        if (run_dir / name).is_file():
            files.atomic_copy(run_dir / name, out / name)
    referenced = config.target.kind == "hf" and not with_target
    meta = atomic.read_json_object(run_dir / "target.json")
    if referenced:
        if meta.get("weights") != "referenced":  # a run that copied them: refer instead
            meta.update(weights="referenced", content_hash=hf.weights_hash(config.target.path))
        files.atomic_write_text(out / "target.json", json.dumps(meta, indent=2))
    elif (run_dir / "target.safetensors").is_file():
        files.atomic_copy(run_dir / "target.json", out / "target.json")
        files.atomic_copy(run_dir / "target.safetensors", out / "target.safetensors")
    else:  # a referenced Hugging Face target, copied on request
        target, info = runs.load_target(run_dir, config.target)
        copied = config.target.model_copy(update={"copy_weights": True})
        runs.save_target(out, target, copied, info)
    for name in FIGURES:
        if (run_dir / "figures" / name).is_file():
            files.atomic_copy(run_dir / "figures" / name, out / "figures" / name)
    summary = runs.read_summary(run_dir)
    files.atomic_write_text(out / "README.md", model_card(config, summary, meta, referenced))
    return out


def card_metadata(config: SPDConfig, info: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML header: what the Hub indexes."""
    meta: dict[str, Any] = {
        "library_name": "spdkit",
        "tags": ["spdkit", "stochastic-parameter-decomposition", "interpretability"],
    }
    target = config.target
    if target is not None and target.kind == "hf":
        meta["base_model"] = str(target.path).partition("@")[0]
        license_ = _target_license(str(target.path))
        if license_:
            meta["license"] = license_
    return meta


def _target_license(path: str) -> str | None:
    """The `license` of the target's own model card (its README.md front matter), if any."""
    try:
        card = hf.model_dir(path) / "README.md"
    except (OSError, ValueError):
        return None
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None


def model_card(
    config: SPDConfig, summary: dict[str, Any], target_meta: dict[str, Any], referenced: bool
) -> str:
    """README.md: YAML metadata, then method, modules, schedule and headline numbers."""
    target = config.target
    info = target_meta.get("info", {})
    header = yaml.safe_dump(card_metadata(config, info), sort_keys=False).strip()
    objective = "VPD" if config.loss.adversarial_recon_coeff or config.components.delta else "SPD"
    rows = [f"| `{m.pattern}` | {m.C} |" for m in config.modules]
    lines = [
        "---",
        header,
        "---",
        "",
        f"# {target.describe()}: a {objective} decomposition (spdkit)",
        "",
        "Every matrix named below is decomposed into C rank-one subcomponents U[:, c] V[c, :],",
        "with a causal-importance function saying which an input needs "
        "(Stochastic Parameter Decomposition).",
        "",
        "| modules | C |",
        "|---|---|",
        *rows,
        "",
        f"- target: {target.describe()}"
        + (f" (revision {info['revision']})" if info.get("revision") else ""),
        f"- CI function: `{config.ci_fn.kind}`; objective: {objective} "
        f"(importance minimality {config.loss.importance_minimality_coeff:g}, "
        f"p {config.importance.pnorm:g}); steps {config.training.steps}, "
        f"batch {config.training.batch_size}, seed {config.seed}",
    ]
    lines += [f"- {line}" for line in headline(summary)]
    if referenced:
        lines.append(
            f"- the target's weights are not in this folder: they load from `{target.path}` "
            "(a Hub id in the local cache, or that folder)"
        )
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "import spdkit",
        'decomp = spdkit.load("THIS_FOLDER_OR_HUB_ID")  # a Hub id: from the local cache',
        "```",
        "",
        "## Upload (nothing is uploaded by spdkit)",
        "",
        "```",
        "hf upload ORG/NAME THIS_FOLDER .",
        "```",
        "",
        "Files: `config.yaml` (resolved config), `components.safetensors` (U, V, CI function), "
        "`target.json` / `target.safetensors`, `summary.json` (the evaluation); format: the "
        'spdkit README, "Run directory".',
        "",
    ]
    return "\n".join(lines)


def headline(summary: dict[str, Any]) -> list[str]:
    """The evaluation's headline numbers, one line each (what is there)."""
    out = []
    if "mean_ci_l0" in summary:
        l0 = summary["mean_ci_l0"]
        total = sum(l0.values()) if isinstance(l0, dict) else l0
        out.append(f"mean CI-L0 (subcomponents needed per input, all modules): {total:.3g}")
    lm = summary.get("lm")
    if lm:
        out.append(
            f"CE: target {lm['target']['ce']:.4f}, CI masks {lm['ci']['ce']:.4f}, "
            f"all subcomponents off {lm['zero']['ce']:.4f} nats"
        )
    match = summary.get("feature_match")
    if match and "mmcs" in match:
        out.append(f"MMCS {match['mmcs']:.4f}, ML2R {match['ml2r']:.4f}")
    for task, row in summary.get("planted_tasks", {}).items():
        out.append(f"{task}: CE target {row['target']:.4f}, CI masks {row['ci']:.4f}")
    return out
