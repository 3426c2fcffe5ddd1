"""Block-restricted subcomponents (`ModuleSpec.blocks`): each piece of an attention matrix lives
in one head, at initialisation and after training."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from spdkit.config import ModuleSpec, load_config
from spdkit.method.components import LinearComponents
from tests.helpers import trainer_for


def _outside_block(comps: LinearComponents, n: int) -> torch.Tensor:
    """The entries of the blocked factor that lie outside their piece's block."""
    blocked = comps.U if comps.block_axis == "out" else comps.V.T  # [size, C]
    size, C = blocked.shape
    row_block = torch.arange(size) // (size // n)
    piece_block = torch.arange(C) // (C // n)
    return blocked[row_block[:, None] != piece_block[None, :]]


def test_blocks_must_divide_C_and_the_axis_is_named():
    with pytest.raises(ValidationError, match="blocks: 3 does not divide C 8"):
        ModuleSpec(pattern="x", C=8, blocks=3)
    with pytest.raises(ValidationError, match="block_axis"):
        ModuleSpec(pattern="x", C=8, blocks=2, block_axis="rows")


def test_a_matrix_that_does_not_split_into_equal_blocks_is_refused_by_name():
    comps = LinearComponents(6, 10, 4, None)
    with pytest.raises(ValueError, match="cannot split 10 rows and C 4 into 4 equal blocks"):
        comps.restrict_to_blocks(4, "out")


def test_init_draws_unit_directions_within_the_block():
    torch.manual_seed(0)
    comps = LinearComponents(6, 8, 4, None)
    comps.restrict_to_blocks(2, "out")
    W = torch.randn(8, 6)
    comps.init_from_target(W)
    assert bool((_outside_block(comps, 2) == 0).all())
    # each rank-one term is ⟨u vᵀ, W⟩ u vᵀ with unit u, v: its overlap with W is its norm²
    for c in range(4):
        term = torch.outer(comps.U[:, c], comps.V[c])
        assert torch.allclose((term * W).sum(), term.norm() ** 2, rtol=1e-5)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_the_gradient_outside_the_block_is_zero_after_a_dtype_move(axis):
    """`.to(dtype)` (as `.to(device)`) keeps the Parameter object, its hook and the support
    buffer (converted with it): the blocked factor's gradient is zero outside its blocks."""
    torch.manual_seed(0)
    comps = LinearComponents(8, 8, 4, None)
    comps.restrict_to_blocks(2, axis)
    comps.init_from_target(torch.randn(8, 8))
    comps.to(torch.float64)
    assert comps.block_support.dtype == torch.float64
    comps(
        torch.randn(5, 8, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ).sum().backward()
    blocked = comps.U if axis == "out" else comps.V
    outside = blocked.grad * (1 - comps.block_support)
    assert bool((outside == 0).all()) and blocked.grad.abs().sum() > 0
    assert torch.allclose(comps.V.norm(dim=1), torch.ones(4, dtype=torch.float64))


def _planted_per_head(steps: int) -> dict:
    cfg = load_config("planted_lm").model_dump(mode="json")
    cfg["target"].update(n_tokens=16, seq_len=17, d_model=16, d_mlp=32, train_steps=1)
    cfg["modules"] = [
        {"pattern": "blocks.*.attn.[qkv]", "C": 8, "blocks": 4, "block_axis": "out"},
        {"pattern": "blocks.*.attn.o", "C": 8, "blocks": 4, "block_axis": "in"},
        {"pattern": "blocks.*.mlp.*", "C": 8},
    ]
    cfg["training"]["steps"] = steps
    cfg["training"]["batch_size"] = 4
    return cfg


def test_pieces_stay_in_their_head_through_training_and_the_rest_learns():
    torch.manual_seed(0)
    trainer = trainer_for(_planted_per_head(steps=5))
    model = trainer.model
    before = {n: model.components(n).U.detach().clone() for n in model.module_names}
    for _ in range(5):
        trainer.train_step()
    for name in model.module_names:
        comps = model.components(name)
        if ".attn." in name:
            assert comps.block_axis == ("in" if name.endswith(".o") else "out")
            outside = _outside_block(comps, 4)
            assert outside.numel() > 0 and bool((outside == 0).all()), name
        else:
            assert getattr(comps, "block_support", None) is None
        assert not torch.equal(comps.U, before[name]), f"{name} did not train"
