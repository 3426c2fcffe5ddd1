"""Property-based: malformed configs give a ConfigError naming the field, never a crash."""

import copy
from collections import Counter

import pytest
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
from spdkit.config.legacy import FLAT_KEYS
from tests.helpers import tiny_tms_dict

BASE = tiny_tms_dict()

# What the properties tried, printed at the end of the module (`pytest -s`): the issue's
# acceptance note states how many malformed configs were generated and how they were rejected.
TALLY: Counter[str] = Counter()
ACCEPTED: Counter[str] = Counter()  # "field=type" of junk values that were valid after all


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    yield
    print(
        f"\nconfig fuzz: {TALLY['bad_value']} configs with one junk value: "
        f"{TALLY['bad_value_rejected']} rejected with an error naming the field, "
        f"{TALLY['bad_value_accepted']} accepted as valid for their field; "
        f"{TALLY['unknown_key']} configs with an unknown key: "
        f"{TALLY['unknown_key_rejected']} rejected naming the key"
    )
    if ACCEPTED:
        print(
            "accepted junk (field=type: count): "
            + ", ".join(f"{k}: {n}" for k, n in ACCEPTED.most_common())
        )


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
    dotted = ".".join(str(p) for p in path)
    TALLY["bad_value"] += 1
    try:
        parse_config(data)
    except ConfigError as err:
        fields = [line.split(":")[0] for line in str(err).splitlines()]
        assert any(f == dotted or f.startswith(dotted) or dotted.startswith(f) for f in fields), (
            dotted,
            str(err),
        )
        TALLY["bad_value_rejected"] += 1
    else:
        TALLY["bad_value_accepted"] += 1
        ACCEPTED[f"{dotted}={type(value).__name__}"] += 1


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
    # a known field, or at the top an old flat key (`optimizer` means `training.optimizer`)
    known = set(model.model_fields) | (
        set(FLAT_KEYS) | {"batch_layerwise_passes"} if not parent else set()
    )
    if key in known or key in node:
        return
    node[key] = 1
    TALLY["unknown_key"] += 1
    try:
        parse_config(data)
    except ConfigError as err:
        assert ".".join((*parent, key)) + ": unknown field" in str(err)
        TALLY["unknown_key_rejected"] += 1
    else:
        raise AssertionError(f"unknown key {key!r} under {parent} was accepted")
