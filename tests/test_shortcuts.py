"""The exact shortcuts behind `masked_forward` (prefix replay, reused inner activations)
against the same passes with them off: same outputs, same gradients, for toy nets and for
Hugging Face GPT-2 and Llama built from configs. And the work they save is really skipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spdkit.config import ModuleSpec
from spdkit.method.model import ALL_SHORTCUTS, NO_SHORTCUTS, ComponentModel
from tests import hf_models


class Blocks(nn.Module):
    """Residual blocks sharing one activation module (called once per block), with an
    optional in-place edit of a module output."""

    def __init__(self, in_place: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.act = nn.GELU()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"norm": nn.LayerNorm(6), "mlp_in": nn.Linear(6, 7), "mlp_out": nn.Linear(7, 6)}
            )
            for _ in range(3)
        )
        self.head = nn.Linear(6, 4)
        self.in_place = in_place

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            h = block["mlp_in"](block["norm"](x))
            h = torch.relu_(h) if self.in_place else self.act(h)
            x = x + block["mlp_out"](h)
        return self.head(x)


TARGETS = {
    "blocks": (lambda: Blocks(), ["blocks.*.mlp_*"], lambda: torch.randn(8, 5)),
    "blocks, in-place edit": (lambda: Blocks(True), ["blocks.*.mlp_*"], lambda: torch.randn(8, 5)),
    "gpt2 mlp": (hf_models.tiny_gpt2, ["transformer.h.*.mlp.*"], None),
    "gpt2 with cache, attn + mlp": (
        lambda: hf_models.tiny_gpt2(use_cache=True),
        ["transformer.h.*.attn.c_attn", "transformer.h.*.mlp.c_fc"],
        None,
    ),
    "llama mlp + attn + embed": (
        hf_models.tiny_llama,
        ["model.layers.*.mlp.*", "model.layers.*.self_attn.o_proj", "model.embed_tokens"],
        None,
    ),
    "llama with cache": (
        lambda: hf_models.tiny_llama(use_cache=True),
        ["model.layers.*.mlp.down_proj"],
        None,
    ),
}


def _model_and_input(case: str) -> tuple[ComponentModel, torch.Tensor]:
    build, patterns, make_x = TARGETS[case]
    target = build()
    torch.manual_seed(1)
    model = ComponentModel(target, [ModuleSpec(pattern=p, C=5) for p in patterns], ci_hidden_dim=3)
    x = make_x() if make_x else torch.randint(0, hf_models.VOCAB, (3, hf_models.SEQ))
    return model, x


def _mask_sets(model: ComponentModel, h: dict[str, torch.Tensor]):
    gen = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(h[n].shape, generator=gen).requires_grad_() for n in model.module_names}
    names = model.module_names
    routes = {n: torch.rand(h[n].shape[:-1], generator=gen) < 0.5 for n in names}
    sets = [(masks, None)] + [({n: masks[n]}, None) for n in names]
    sets.append(({n: masks[n] for n in names[1::2]}, None))  # a subset
    sets.append((masks, routes))  # per-position routing
    return masks, sets


def _passes(model: ComponentModel, x: torch.Tensor, shortcuts):
    record = model.record(x)
    h = model.inner_acts(record.inputs)
    masks, sets = _mask_sets(model, h)
    outs = [
        model.masked_forward(x, m, record, inner=h, routes=r, shortcuts=shortcuts) for m, r in sets
    ]
    loss = sum((y - record.output).square().mean() for y in outs)
    components = [p for n in model.module_names for p in model.components(n).parameters()]
    params = components + list(masks.values())
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return [y.detach() for y in outs], grads


@pytest.mark.parametrize("case", list(TARGETS))
def test_shortcuts_change_no_output_and_no_gradient(case):
    model, x = _model_and_input(case)
    fast_out, fast_grads = _passes(model, x, ALL_SHORTCUTS)
    plain_out, plain_grads = _passes(model, x, NO_SHORTCUTS)
    for a, b in zip(fast_out, plain_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    nonzero = 0
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        nonzero += bool(b.abs().sum() > 0)
    assert nonzero == len(fast_grads)  # the comparison covers real gradients


def _calls_inside(model: ComponentModel, prefix: str) -> list[str]:
    """Record which modules under `prefix` run while the context is used."""
    calls: list[str] = []
    for name, module in model.target.named_modules():
        if name.startswith(prefix):
            module.register_forward_pre_hook(lambda _m, _a, n=name: calls.append(n))
    return calls


def test_a_pass_masking_layer_k_runs_nothing_inside_the_layers_before_it():
    target = hf_models.tiny_llama(n_layers=4)
    model = ComponentModel(target, [ModuleSpec(pattern="model.layers.*.mlp.*", C=5)], 3)
    x = torch.randint(0, hf_models.VOCAB, (2, hf_models.SEQ))
    record = model.record(x)
    inside_early = _calls_inside(model, "model.layers.1.")  # hooks added after the record
    inside_late = _calls_inside(model, "model.layers.3.")
    masks = {"model.layers.2.mlp.up_proj": torch.rand(2, hf_models.SEQ, 5)}
    model.masked_forward(x, masks, record)
    assert inside_early == []  # layer 1 returned its recorded output as a whole
    assert "model.layers.3.self_attn.q_proj" in inside_late  # layer 3 ran
    model.masked_forward(x, masks, record, shortcuts=NO_SHORTCUTS)
    assert "model.layers.1.self_attn.q_proj" in inside_early


def test_the_record_keeps_only_outputs_a_pass_could_start_after():
    target = hf_models.tiny_llama(n_layers=4)
    model = ComponentModel(target, [ModuleSpec(pattern="model.layers.*.mlp.*", C=5)], 3)
    record = model.record(torch.randint(0, hf_models.VOCAB, (2, hf_models.SEQ)))
    kept = [u.call.module for u in record.replayable]
    assert "model.layers.0" in kept and "model.layers.2" in kept
    # nothing inside attention: no decomposed module starts inside it, so a pass that starts
    # later replays the whole attention call instead
    assert not any(".self_attn." in name for name in kept)
    assert "model.layers.3.mlp.down_proj" not in kept  # no pass starts after the last module


def test_a_module_run_twice_is_an_error_naming_it():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    model = ComponentModel(Twice(), [ModuleSpec(pattern="lin", C=2)], 2)
    with pytest.raises(ValueError, match="'lin' ran twice"):
        model.record(torch.randn(2, 4))


class Appender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, sink: list):
        sink.append(self.lin(x))  # an effect besides the return value (like a cache update)
        return x


class LeavesState(nn.Module):
    """A target whose first module leaves state for a later one in an object it is passed,
    created per forward: replaying the first module skips that effect."""

    def __init__(self) -> None:
        super().__init__()
        self.first = Appender()
        self.second = nn.Linear(4, 4)

    def forward(self, x):
        sink: list = []
        self.first(x, sink)
        return self.second(sink[0])


def test_prefix_replay_can_be_switched_off_for_targets_with_side_effects():
    x = torch.randn(3, 4)
    masks = {"second": torch.ones(3, 2)}
    for replay in (True, False):
        torch.manual_seed(0)
        model = ComponentModel(
            LeavesState(), [ModuleSpec(pattern="second", C=2)], 2, prefix_replay=replay
        )
        record = model.record(x)
        if replay:  # the replayed call does not append: the later module finds no buffer entry
            with pytest.raises(IndexError):
                model.masked_forward(x, masks, record)
        else:
            torch.testing.assert_close(
                model.masked_forward(x, masks, record),
                model.masked_forward(x, masks, record, shortcuts=NO_SHORTCUTS),
            )
