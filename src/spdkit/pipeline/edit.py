"""`spdkit edit`: the target with chosen subcomponents removed from its weights (the static
edit W' = W − Σ_{c∈S} U[:, c] V[c, :], `analysis/ablation.py`), written in the target's own
format, reloaded from disk and measured.

Formats: a bundled or Python-factory target is written as `target.safetensors` +
`target.json` (what a run directory holds, so `spdkit run CONFIG --target DIR` decomposes the
edited model); a Hugging Face target as a `save_pretrained` folder (with the tokenizer when its
original directory has one) that plain `transformers` loads. `DIR/edit.json` records what was
removed and the measured effect: per position group, the scored CE of the original target,
of the edited one as reloaded from DIR, and of the target with every decomposed subcomponent
removed, and the fraction (edited − target) / (everything − target); for targets whose groups
have a chance CE (`planted_lm`'s tasks) also the fraction of the way to min(everything,
chance) (`ablation.reference_ce`: one task's rule removed should cost chance, no more).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spdkit import files
from spdkit.analysis import ablation
from spdkit.api import Decomposition
from spdkit.method.forwards import model_output
from spdkit.store import runs
from spdkit.targets import hf, target_kind
from spdkit.targets.transformer import scored_token_ce

log = logging.getLogger(__name__)

EDIT_FILE = "edit.json"


def edit_target(
    decomp: Decomposition,
    items: Sequence[str],
    out: Path,
    n: int = 256,
    seed: int | None = None,
) -> dict[str, Any]:
    """Write the target with `items` (`cluster:<id>`, `specific:<group>`, `<module>:<index>`)
    removed into `out`, reload it from there and measure it on n held-out sequences (per
    group) of draw `seed`; returns (and writes) edit.json's content. Specific sets were
    chosen on draw 0 (`analysis/specific.py`), so seed None measures them on draw 1, sequences
    they were not chosen on (`ablation.measured_draw`)."""
    seed = ablation.measured_draw(items, seed)
    config = decomp.config
    sizes = {m: decomp.model.components(m).C for m in decomp.module_names}
    off = ablation.parse_items(items, decomp.saved_clusters(), sizes, decomp.saved_specific(items))
    if not off:
        raise ValueError(
            "name what to remove: --off cluster:<id>, specific:<group> or <module>:<index>"
        )
    inserted = [m for m in off if m in decomp.model.identity_modules]
    if inserted:
        raise ValueError(
            f"{inserted[0]} is an identity spdkit inserted, not a weight of the target: "
            "it cannot be edited into the target"
        )
    target = original_target(decomp)
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, weight in ablation.edited_weights(decomp.model, off).items():
            params[name].copy_(weight.to(params[name].device, params[name].dtype))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside `out` and renamed to it when complete: a killed edit leaves no half
    # folder at `out` (only a hidden `.<name>.partial-*` beside it), so the command reruns
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    is_hf = config.target is not None and config.target.kind == "hf"
    if is_hf:
        write_hf(target, config.target.path, partial)
    else:
        info = {"edited_from": str(decomp.run_dir), "removed": list(items)}
        runs.save_target(partial, target, config.target, info)
    reloaded = reload(decomp, partial, is_hf)
    result = {
        "removed": list(items),
        "off": off,
        "format": "save_pretrained" if is_hf else "target.safetensors",
        "seed": seed,
        "groups": measure_edit(decomp, reloaded, off, n, seed),
    }
    files.atomic_write_text(partial / EDIT_FILE, json.dumps(result, indent=1) + "\n")
    partial.chmod(0o777 & ~files.UMASK)  # mkdtemp makes 0700; an edit is for sharing
    os.replace(partial, out)  # onto a missing or empty folder
    return result


def original_target(decomp: Decomposition) -> nn.Module:
    """A fresh copy of the run's target (from its target.safetensors: the component model's
    target may hold inserted identities); without a run directory, a copy of the model's."""
    config = decomp.config
    if decomp.run_dir is not None and config.target is not None:
        device = next(decomp.model.parameters()).device
        return runs.load_target(decomp.run_dir, config.target)[0].to(device)
    if decomp.model.identity_modules:
        raise ValueError("a decomposition with inserted identities needs its run directory")
    return copy.deepcopy(decomp.model.target)


def write_hf(model: nn.Module, source: str, out: Path) -> None:
    """A `save_pretrained` folder, with the tokenizer of the original directory if it has one
    (an edit changes no token)."""
    model.save_pretrained(out)
    try:
        hf.tokenizer(source).save_pretrained(out)
    except (OSError, ValueError) as err:  # no tokenizer there: the weights are the edit
        log.warning("no tokenizer copied into %s (%s)", out, err)


def reload(decomp: Decomposition, out: Path, is_hf: bool) -> nn.Module:
    """The edited target as a user loads it: plain `transformers` for a Hugging Face folder,
    the run-directory loader otherwise."""
    device = next(decomp.model.parameters()).device
    if is_hf:
        return hf.load_hf_model(out).to(device)
    return runs.load_target(out, decomp.config.target)[0].to(device)


@torch.no_grad()
def measure_edit(
    decomp: Decomposition, edited: nn.Module, off: ablation.Off, n: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per position group: scored CE of the target, the reloaded edit, everything removed;
    the fraction, and the largest |logit| difference between the reloaded edit and the
    in-memory one (the file round trip)."""
    model, chunk = decomp.model, decomp.config.eval.batch_size
    groups = ablation.position_groups(decomp, n, seed)
    target_config = decomp.config.target
    chance_ce = target_kind(target_config).chance_ce if target_config else None
    every = ablation.everything(model)
    base, full = ablation.scored_ces(model, groups, [("static", None), ("static", every)], chunk)
    in_memory = ablation.edited_forward(model, off)
    out = {}
    for group, (ids, scored) in groups.items():
        total, diff = 0.0, 0.0
        for piece in ablation.group_chunks(model, ids, scored, chunk):
            logits: Tensor = model_output(edited(piece.ids), model.output_field)
            total += scored_token_ce(logits, piece.ids)[piece.scored[:, 1:]].sum().item()
            diff = max(diff, (logits - in_memory(piece.ids)).abs().max().item())
        ce = total / max(1, int(scored[:, 1:].sum()))
        out[group] = {
            "target": base[group],
            "edited": ce,
            "everything": full[group],
            "fraction": ablation.fraction(ce, base[group], full[group]),
            "reload_max_abs_diff": diff,
        }
        if chance_ce is not None:
            chance = chance_ce(target_config, group)
            reference = ablation.reference_ce(base[group], full[group], chance)
            out[group]["chance_ce"] = chance
            out[group]["fraction_to_reference"] = ablation.fraction(ce, base[group], reference)
    return out
