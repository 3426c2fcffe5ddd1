"""Causal-importance function kinds: formulas, shapes, what they may read, serialisation,
save → load, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spdkit.api import load
from spdkit.config import (
    GlobalMLPCIConfig,
    GlobalTransformerCIConfig,
    MLPCIConfig,
    VectorMLPCIConfig,
    parse_config,
)
from spdkit.method.ci import ModuleSlot, build_ci_function
from spdkit.pipeline.run import run_experiment
from spdkit.store import runs
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer
from tests.helpers import tiny_tms_dict

SLOTS = [ModuleSlot("b.lin", 3, 5), ModuleSlot("a.lin", 2, 4)]
KINDS = {
    "mlp": MLPCIConfig(hidden_dim=4),
    "vector_mlp": VectorMLPCIConfig(hidden_dims=[6]),
    "global_mlp": GlobalMLPCIConfig(hidden_dims=[7]),
    "global_transformer": GlobalTransformerCIConfig(d_model=8, n_heads=2, d_ff=16, n_layers=2),
}


def _io(leading=(4, 6)):
    torch.manual_seed(0)
    inputs = {"b.lin": torch.randn(*leading, 5), "a.lin": torch.randn(*leading, 4)}
    inner = {"b.lin": torch.randn(*leading, 3), "a.lin": torch.randn(*leading, 2)}
    return inputs, inner


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_gives_each_module_its_C_on_every_position(kind):
    ci = build_ci_function(KINDS[kind], SLOTS)
    inputs, inner = _io()
    lower, upper = ci(inputs, inner)
    assert {n: tuple(g.shape) for n, g in lower.items()} == {"b.lin": (4, 6, 3), "a.lin": (4, 6, 2)}
    raw = ci.raw(inputs, inner)
    for n in raw:  # the sigmoids are the paper's, applied to the kind's raw output
        torch.testing.assert_close(upper[n], raw[n].clamp(0, 1) + 0.01 * (raw[n] - 1).clamp(min=0))


def test_vector_mlp_by_formula():
    ci = build_ci_function(KINDS["vector_mlp"], SLOTS)
    inputs, inner = _io()
    net = ci.functions["a__lin"].net
    a = inputs["a.lin"]
    a_n = a / a.pow(2).mean(-1, keepdim=True).add(torch.finfo(a.dtype).eps).sqrt()
    expected = net[2](F.gelu(net[0](a_n)))
    torch.testing.assert_close(ci.raw(inputs, inner)["a.lin"], expected)


@pytest.mark.parametrize("kind", ["vector_mlp", "global_mlp", "global_transformer"])
def test_input_norm_rms_loses_the_scale_and_none_keeps_it(kind):
    """rms: a and 3a are the same input to the function; none: they are not."""
    inputs, inner = _io()
    scaled = {n: 3.0 * v for n, v in inputs.items()}
    for norm, same in (("rms", True), ("none", False)):
        cfg = KINDS[kind].model_copy(update={"input_norm": norm})
        ci = build_ci_function(cfg, SLOTS)
        a, b = ci.raw(inputs, inner)["a.lin"], ci.raw(scaled, inner)["a.lin"]
        assert torch.allclose(a, b, atol=1e-5) == same


@pytest.mark.parametrize("kind", ["vector_mlp", "global_mlp", "global_transformer"])
def test_reads_input_inner_or_both(kind):
    """`reads`: which of a and h = a Vᵀ the function sees; what it does not read cannot
    change its output, and built through the model, h carries V's gradient into the CI."""
    inputs, inner = _io()
    moved_a = {n: v + torch.randn_like(v) for n, v in inputs.items()}
    moved_h = {n: v + torch.randn_like(v) for n, v in inner.items()}
    for reads, sees_a, sees_h in (
        ("input", True, False),
        ("inner", False, True),
        ("input+inner", True, True),
    ):
        slots = [ModuleSlot(s.name, s.C, s.d_in, reads) for s in SLOTS]
        ci = build_ci_function(KINDS[kind].model_copy(update={"reads": reads}), slots)
        out = ci.raw(inputs, inner)["a.lin"]
        assert torch.allclose(ci.raw(moved_a, inner)["a.lin"], out) != sees_a  # changed iff read
        assert torch.allclose(ci.raw(inputs, moved_h)["a.lin"], out) != sees_h
    config = parse_config(tiny_tms_dict(ci_fn={"kind": kind, "reads": "inner"}))
    target = target_kind(config.target).build(config.target)
    model = build_trainer(target, data_source(config), config, "cpu").model
    x = torch.rand(8, 5)
    record = model.record(x)
    g, _ = model.causal_importances(record.inputs, model.inner_acts(record.inputs))
    sum(v.sum() for v in g.values()).backward()
    assert model.components("linear1").V.grad.abs().sum() > 0


def test_global_mlp_reads_every_module_in_sorted_order():
    ci = build_ci_function(KINDS["global_mlp"], SLOTS)
    assert [s.name for s in ci.slots] == ["a.lin", "b.lin"]
    inputs, inner = _io()
    out = ci.raw(inputs, inner)
    changed = dict(inputs, **{"b.lin": inputs["b.lin"] + torch.randn_like(inputs["b.lin"])})
    # module a's CI depends on module b's input: it is global
    assert not torch.allclose(ci.raw(changed, inner)["a.lin"], out["a.lin"])


def test_global_transformer_causal_and_bidirectional_and_position_wise():
    inputs, inner = _io()
    later = {n: v.clone() for n, v in inputs.items()}
    later["b.lin"][:, 4:] += 1.0  # change positions 4, 5 only
    for causal in (True, False):
        cfg = GlobalTransformerCIConfig(d_model=8, n_heads=2, d_ff=16, causal=causal)
        ci = build_ci_function(cfg, SLOTS)
        before, after = ci.raw(inputs, inner)["a.lin"], ci.raw(later, inner)["a.lin"]
        early_same = torch.allclose(before[:, :4], after[:, :4], atol=1e-6)
        assert early_same == causal  # bidirectional: earlier positions see later inputs
    # [batch, d] inputs: a position-wise network, each sample on its own
    flat_in, flat_inner = _io(leading=(5,))
    one = ci.raw({n: v[:1] for n, v in flat_in.items()}, {n: v[:1] for n, v in flat_inner.items()})
    torch.testing.assert_close(ci.raw(flat_in, flat_inner)["a.lin"][:1], one["a.lin"])


def test_global_kinds_refuse_modules_that_see_different_positions():
    inputs, inner = _io()
    inputs["a.lin"], inner["a.lin"] = inputs["a.lin"][:, :3], inner["a.lin"][:, :3]
    ci = build_ci_function(KINDS["global_mlp"], SLOTS)
    with pytest.raises(ValueError, match="same positions"):
        ci.raw(inputs, inner)


def test_tensor_names_in_the_run_directory():
    names = {k: set(build_ci_function(c, SLOTS).tensors()) for k, c in KINDS.items()}
    assert names["mlp"] == {
        f"{m}.ci.{p}" for m in ("a.lin", "b.lin") for p in ("w_in", "b_in", "w_out", "b_out")
    }
    assert (
        "a.lin.ci.net.0.weight" in names["vector_mlp"]
        and "b.lin.ci.net.2.bias" in names["vector_mlp"]
    )
    assert names["global_mlp"] == {f"ci.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert {"ci.in_proj.weight", "ci.blocks.1.qkv.weight", "ci.out_proj.bias"} <= names[
        "global_transformer"
    ]


@pytest.mark.parametrize("kind", ["vector_mlp", "global_mlp", "global_transformer"])
def test_save_load_gives_identical_ci_and_resume_is_bit_exact(kind, tmp_path):
    ci_fn = {
        "vector_mlp": {"kind": "vector_mlp", "hidden_dims": [8]},
        "global_mlp": {"kind": "global_mlp", "hidden_dims": [8]},
        "global_transformer": {"kind": "global_transformer", "d_model": 8, "n_heads": 2},
    }[kind]
    config = parse_config(tiny_tms_dict(ci_fn=ci_fn, steps=20, checkpoint_every=10))
    run_experiment(config, tmp_path / "run", progress=False)
    decomp = load(tmp_path / "run")
    x = torch.rand(16, 5)
    trained, _ = runs.load_tensors(tmp_path / "run" / "components.safetensors")
    assert any(k.startswith(("ci.", "linear1.ci.")) for k in trained)
    record = decomp.model.record(x)
    ci_loaded = decomp.model.causal_importances(
        record.inputs, decomp.model.inner_acts(record.inputs)
    )
    torch.testing.assert_close(ci_loaded[0], decomp.causal_importance(x, upper=False))
    for k, v in decomp.model.ci.tensors().items():
        assert torch.equal(v, trained[k]), k

    # resume from step 10 against the uninterrupted 20 steps
    torch.manual_seed(0)
    target = target_kind(config.target).build(config.target)
    part = build_trainer(target, data_source(config), config, "cpu")
    whole_target = target_kind(config.target).build(config.target)
    whole_target.load_state_dict(target.state_dict())
    whole = build_trainer(whole_target, data_source(config), config, "cpu")
    for _ in range(20):
        whole.train_step()
    for _ in range(10):
        part.train_step()
    tensors, meta = part.state_tensors()
    again_target = target_kind(config.target).build(config.target)
    again_target.load_state_dict(target.state_dict())
    again = build_trainer(again_target, data_source(config), config, "cpu")
    again.load_state({k: v.clone() for k, v in tensors.items()}, meta)
    for _ in range(10):
        again.train_step()
    for a, b in zip(
        whole.model.trainable_parameters(), again.model.trainable_parameters(), strict=True
    ):
        assert torch.equal(a, b)


def test_configs_without_ci_fn_are_the_papers_kind():
    assert parse_config(tiny_tms_dict()).ci_fn.kind == "mlp"


def test_a_run_directory_written_before_ci_fn_existed_loads_and_resumes(tmp_path):
    """tests/fixtures/run_26f5880: a tiny TMS run written by spdkit at commit 26f5880 (before
    the record / seam engine and the ci_fn section), with the CI that code computed on a
    fixed input. Today's code reads it as the `mlp` kind and gives the same CI."""
    import shutil

    from safetensors.torch import load_file

    from spdkit.pipeline.run import resume_run

    fixture = Path(__file__).parent / "fixtures" / "run_26f5880"
    decomp = load(fixture)
    assert decomp.config.ci_fn.kind == "mlp"
    expected = load_file(fixture / "expected_ci.safetensors")
    ci = decomp.causal_importance(expected["x"], upper=False)
    for name in ("linear1", "linear2"):
        torch.testing.assert_close(ci[name], expected[name], atol=1e-6, rtol=0)
    # its checkpoint resumes under today's code
    run = tmp_path / "old"
    shutil.copytree(fixture, run)
    (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace("steps: 20\n", "steps: 25\n")
    )
    summary = resume_run(run, progress=False)
    assert runs.read_metrics(run)[-1]["step"] == 25 and "final_losses" in summary


def test_one_position_attention_is_v_exactly_as_sdpa_computes_it():
    """The global transformer's one-position case (TMS, residual MLPs) skips SDPA: softmax over
    one key is 1, so the block must give SDPA's output and gradients."""
    from spdkit.method.ci.global_transformer import Block, rms, rope

    torch.manual_seed(0)
    block = Block(d_model=8, n_heads=2, d_ff=16)
    z = torch.randn(32, 1, 8, requires_grad=True)

    def with_sdpa(z):
        B, T, D = z.shape
        q, k, v = block.qkv(rms(z)).view(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(rope(q), rope(k), v)
        z = z + block.out(att.transpose(1, 2).reshape(B, T, D))
        return z + block.ff_out(F.gelu(block.ff_in(rms(z))))

    grads = []
    for fn in (lambda z: block(z, causal=False), with_sdpa):
        block.zero_grad()
        z.grad = None
        out = fn(z)
        (out * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append((out.detach(), z.grad.clone(), block.qkv.weight.grad.clone()))
    (fast, dz_fast, dw_fast), (ref, dz_ref, dw_ref) = grads
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(dz_fast, dz_ref)
    torch.testing.assert_close(dw_fast, dw_ref)
    assert bool((dw_fast[:16] == 0).all())  # q and k: no gradient through one key
