"""The step record: what one target forward did, as a frozen value, and how to replay it.

`record_forward` runs the target once without gradients, with forward hooks on *every*
module (removed before it returns), and returns a `Record`: the target's output, each
decomposed module's input a^l (and its order), the clock at which every module call started
and ended, and the outputs a later masked pass may reuse.

Prefix replay (the shortcut behind `ComponentModel.masked_forward`): a masked pass whose first
masked module starts at clock s* computes exactly the target's forward until then, because
nothing before it is masked and nothing upstream is trainable. So every module call that
*ended* before s* may return the output the record holds instead of running: embeddings,
whole transformer blocks, attention, norms, for any `nn.Module`, with no per-architecture
code. Only the outermost such calls are replayed; whatever they contain never runs.

What the record keeps (memory): a call's output is kept only if some decomposed module starts
after the call ends and before its nearest replayable enclosing call ends; otherwise any pass
that could replay it replays an enclosing call instead. For a stack of blocks that is about one
tensor per block. A call whose output is not a tree of tensors (a cache object, say) or whose
tensors the target later edits in place is never replayed: the pass recomputes it.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

RUN = object()  # a replay-plan action: the call runs its own forward


@dataclass(frozen=True)
class Call:
    """One module call of the recorded forward: [start, end] on the record's clock."""

    module: str
    start: int
    end: int


@dataclass(frozen=True)
class Replayable:
    """A call whose output a masked pass may return instead of running it."""

    call: Call
    output: Any
    tensors: tuple[Tensor, ...]  # the output's tensors, to check they were not edited since
    versions: tuple[int, ...]


@dataclass(frozen=True)
class Record:
    """The target forward on one batch (no grad): a value the step passes around.

    `output` f(x|W); `inputs[name]` a^l [..., d_in] of each decomposed module; `order` the
    decomposed modules in the order they ran; `starts[name]` when each started; `calls` every
    module call (name, start, end) in start order; `replayable` the outputs kept for replay.
    """

    output: Tensor
    inputs: Mapping[str, Tensor]
    order: tuple[str, ...]
    starts: Mapping[str, int]
    calls: tuple[Call, ...] = field(repr=False)
    replayable: tuple[Replayable, ...] = field(repr=False)

    def first(self, names: Iterable[str]) -> str:
        """The module among `names` that runs first."""
        return min(names, key=self.starts.__getitem__)


@dataclass
class _Open:
    module: str
    start: int
    pending: list[Replayable]


def _tensor_leaves(obj: Any) -> tuple[Tensor, ...] | None:
    """The tensors of a module output that is a tree of tensors and plain values (tuples,
    lists, dicts, HF ModelOutputs); None if it holds anything else (an object that could be
    mutated, like a key-value cache)."""
    leaves, _ = tree_flatten(obj)
    if not all(
        leaf is None or isinstance(leaf, (Tensor, int, float, bool, str)) for leaf in leaves
    ):
        return None
    return tuple(leaf for leaf in leaves if isinstance(leaf, Tensor))


class _Recorder:
    """Forward hooks that build a Record; see the module docstring for what is kept."""

    def __init__(self, decomposed: frozenset[str]) -> None:
        self.decomposed = decomposed
        self.clock = 0
        self.stack: list[_Open] = []
        self.calls: list[Call] = []
        self.kept: list[Replayable] = []
        self.starts: dict[str, int] = {}
        self.decomposed_starts: list[int] = []  # sorted: appended as the clock advances
        self.inputs: dict[str, Tensor] = {}
        self.input_versions: dict[str, int] = {}

    def pre(self, name: str) -> None:
        self.clock += 1
        if name in self.decomposed:
            if name in self.starts:
                raise ValueError(
                    f"decomposed module {name!r} ran twice in one forward (shared weights); "
                    "decompose a module that is called once per forward"
                )
            self.starts[name] = self.clock
            self.decomposed_starts.append(self.clock)
        self.stack.append(_Open(name, self.clock, []))

    def post(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        self.clock += 1
        opened = self.stack.pop()
        assert opened.module == name, f"hook order broken: {opened.module} closed as {name}"
        call = Call(name, opened.start, self.clock)
        self.calls.append(call)
        if name in self.decomposed:
            a = args[0] if args else next(iter(kwargs.values()))
            self.inputs[name], self.input_versions[name] = a, a._version
        if not self.stack:  # the root call: resolve what is still pending
            self._resolve(opened.pending, call.end)
            return
        parent = self.stack[-1]
        tensors = _tensor_leaves(output)
        if tensors is None:  # never replayed: what it holds is decided by an enclosing call
            parent.pending.extend(opened.pending)
            return
        self._resolve(opened.pending, call.end)
        versions = tuple(t._version for t in tensors)
        parent.pending.append(Replayable(call, output, tensors, versions))

    def _resolve(self, pending: list[Replayable], until: int) -> None:
        """Keep a pending output iff a decomposed module starts after it ended and by `until`
        (the end of its nearest replayable enclosing call): only such a pass replays it."""
        for unit in pending:
            i = bisect.bisect_right(self.decomposed_starts, unit.call.end)
            if i < len(self.decomposed_starts) and self.decomposed_starts[i] <= until:
                self.kept.append(unit)

    @contextlib.contextmanager
    def hooks(self, target: nn.Module) -> Iterator[None]:
        handles = []
        for name, module in target.named_modules():
            handles.append(module.register_forward_pre_hook(lambda _m, _a, n=name: self.pre(n)))
            handles.append(
                module.register_forward_hook(
                    lambda _m, a, kw, out, n=name: self.post(n, a, kw, out), with_kwargs=True
                )
            )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@torch.no_grad()
def record_forward(
    target: nn.Module, x: Tensor, decomposed: list[str], output_of: Callable[[Any], Tensor]
) -> Record:
    """One no-grad target forward on x with every module call timed (see module docstring).

    `output_of` turns the target's return value into the compared tensor. Errors name a
    decomposed module that did not run or ran twice.
    """
    recorder = _Recorder(frozenset(decomposed))
    with recorder.hooks(target):
        output = output_of(target(x))
    missing = [n for n in decomposed if n not in recorder.inputs]
    if missing:
        raise ValueError(
            f"decomposed module(s) {missing} did not run in the target's forward; "
            "decompose only modules the forward uses"
        )
    edited = [n for n, a in recorder.inputs.items() if a._version != recorder.input_versions[n]]
    if edited:
        raise ValueError(
            f"the target edits the input of decomposed module(s) {edited} in place after they "
            "ran (e.g. an inplace activation); spdkit needs each module's input as it was"
        )
    # an output edited in place after its call no longer equals what the call returned
    replayable = tuple(
        sorted(
            (
                u
                for u in recorder.kept
                if all(t._version == v for t, v in zip(u.tensors, u.versions, strict=True))
            ),
            key=lambda u: u.call.start,
        )
    )
    return Record(
        output=output,
        inputs=dict(recorder.inputs),
        order=tuple(sorted(recorder.starts, key=recorder.starts.__getitem__)),
        starts=dict(recorder.starts),
        calls=tuple(sorted(recorder.calls, key=lambda c: c.start)),
        replayable=replayable,
    )


def replay_plan(record: Record, first_start: int) -> dict[str, list[Any]]:
    """For a pass whose first masked module starts at `first_start`: per module, the action
    for each of its calls that will happen in the pass, in order: a recorded output to return,
    or RUN. Only the outermost replayable calls that ended before `first_start` replay; calls
    inside them never happen. Modules without a replayed call are left out."""
    chosen: list[Replayable] = []
    for unit in record.replayable:  # in start order: an enclosing call comes first
        if unit.call.end < first_start and (not chosen or unit.call.start > chosen[-1].call.end):
            chosen.append(unit)
    if not chosen:
        return {}
    starts = [u.call.start for u in chosen]
    by_start = {u.call.start: u for u in chosen}
    replayed_modules = {u.call.module for u in chosen}
    plan: dict[str, list[Any]] = {}
    for call in record.calls:
        if call.module not in replayed_modules or call.start >= first_start:
            continue
        i = bisect.bisect_right(starts, call.start) - 1
        if i >= 0 and chosen[i].call.start < call.start < chosen[i].call.end:
            continue  # inside a replayed call: it does not happen
        unit = by_start.get(call.start)
        plan.setdefault(call.module, []).append(unit.output if unit is not None else RUN)
    return plan


def assert_unchanged(record: Record) -> None:
    """Internal check after a masked pass: the recorded outputs it returned were not edited in
    place (the recording forward would have shown such an edit, so this means the pass took a
    different path through the target's code than the recording did)."""
    for unit in record.replayable:
        for t, v in zip(unit.tensors, unit.versions, strict=True):
            assert t._version == v, f"a masked pass edited {unit.call.module}'s output in place"
