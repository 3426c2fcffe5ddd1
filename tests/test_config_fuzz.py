"""Property-based: malformed configs give a ConfigError naming the field, never a crash."""

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from spdkit.config import (
    ConfigError,
    EvalConfig,
    OptimizerConfig,
    SPDConfig,
    TMSTargetConfig,
    parse_config,
)
from tests.conftest import tiny_tms_dict

BASE = tiny_tms_dict()


def leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaf_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaf_paths(value, (*prefix, i))
    else:
        yield prefix


PATHS = list(leaf_paths(BASE))
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def set_path(data, path, value):
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(PATHS), value=JUNK)
def test_a_bad_value_names_its_field(path, value):
    data = copy.deepcopy(BASE)
    set_path(data, path, value)
    try:
        parse_config(data)
    except ConfigError as err:
        dotted = ".".join(str(p) for p in path)
        fields = [line.split(":")[0] for line in str(err).splitlines()]
        assert any(f == dotted or f.startswith(dotted) or dotted.startswith(f) for f in fields), (
            dotted,
            str(err),
        )


@settings(max_examples=100, deadline=None)
@given(
    parent=st.sampled_from([(), ("target",), ("optimizer",), ("eval",)]),
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
)
def test_an_unknown_key_is_named(parent, key):
    data = copy.deepcopy(BASE)
    node = data
    for part in parent:
        node = node.setdefault(part, {})
    model = {(): SPDConfig, ("target",): TMSTargetConfig, ("optimizer",): OptimizerConfig}.get(
        parent, EvalConfig
    )
    if key in model.model_fields:
        return
    node[key] = 1
    try:
        parse_config(data)
    except ConfigError as err:
        assert ".".join((*parent, key)) + ": unknown field" in str(err)
    else:
        raise AssertionError(f"unknown key {key!r} under {parent} was accepted")
