"""Tests for lora_course.tree: property tests against mlx.utils, plus worked examples."""

from collections import namedtuple

import lora_course  # noqa: F401  (preloads the BLAS; must come before mlx.core)
from lora_course.tree import tree_flatten, tree_map, tree_unflatten

import mlx.core as mx
import mlx.nn as nn
import mlx.utils as mu
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

Pair = namedtuple("Pair", ["first", "second"])

# -- strategies ---------------------------------------------------------------

leaves = st.one_of(
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
)
# Dict keys as models use them (identifiers), plus ints and numeric-looking
# strings, which take the list path when a flat tree is rebuilt.
names = st.sampled_from(["w", "b", "weight", "bias", "layers", "q_proj", "lora_a", "x1"])
odd_keys = st.sampled_from(["0", "1", "01", "10", "-1", "1_0", "+2", "a.b", ""])
dict_keys = st.one_of(names, odd_keys, st.integers(0, 12))


def containers(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.builds(Pair, children, children),
        st.dictionaries(dict_keys, children, max_size=4),
    )


trees = st.recursive(leaves, containers, max_leaves=20)

# Trees that survive a flatten/unflatten round trip: non-empty dicts with
# identifier keys and non-empty lists (tuples come back as lists, empties vanish).
round_trip_trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=4),
        st.dictionaries(names, children, min_size=1, max_size=4),
    ),
    max_leaves=20,
)

# Flat trees with arbitrary dotted keys: components may be numeric (lists), have
# gaps ("0", "3"), or collide as integers ("1" vs "01"). Keys are unique and have
# no empty components, which mlx.utils also needs to terminate.
components = st.sampled_from(["0", "1", "2", "3", "01", "10", "-1", "a", "b", "w", "layers"])
dotted_keys = st.lists(components, min_size=1, max_size=4).map(".".join)
flat_trees = st.dictionaries(dotted_keys, leaves, max_size=8)


def same(a, b):
    """Structural equality that also checks container types and key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, mx.array):
        return a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()
    return a == b


def is_pair(node):
    return isinstance(node, (list, tuple)) and len(node) == 2


# -- property tests: ours == mlx.utils ----------------------------------------


@settings(max_examples=300, deadline=None)
@given(trees)
def test_tree_map_matches_mlx(tree):
    ours, theirs = [], []
    result_ours = tree_map(lambda x: ours.append(x) or ("seen", x), tree)
    result_theirs = mu.tree_map(lambda x: theirs.append(x) or ("seen", x), tree)
    assert same(result_ours, result_theirs)
    assert same(ours, theirs)  # leaves visited in the same order


@settings(max_examples=200, deadline=None)
@given(trees)
def test_tree_map_with_rest_and_is_leaf_matches_mlx(tree):
    other = mu.tree_map(lambda x: [x, x], tree)  # a superset of tree: leaves became lists
    pairs = lambda x, y: (x, len(y))  # noqa: E731
    assert same(tree_map(pairs, tree, other), mu.tree_map(pairs, tree, other))
    assert same(tree_map(repr, tree, is_leaf=is_pair), mu.tree_map(repr, tree, is_leaf=is_pair))


@settings(max_examples=300, deadline=None)
@given(trees, st.sampled_from(["", ".", ".model", "xmodel", "m"]), st.booleans())
def test_tree_flatten_matches_mlx(tree, prefix, stop_at_pairs):
    is_leaf = is_pair if stop_at_pairs else None
    assert same(tree_flatten(tree, prefix, is_leaf), mu.tree_flatten(tree, prefix, is_leaf))
    assert same(
        tree_flatten(tree, prefix, is_leaf, destination={}),
        mu.tree_flatten(tree, prefix, is_leaf, destination={}),
    )


@settings(max_examples=300, deadline=None)
@given(flat_trees, st.booleans())
def test_tree_unflatten_matches_mlx(flat, as_dict):
    items = flat if as_dict else list(flat.items())
    assert same(tree_unflatten(items), mu.tree_unflatten(items))


@settings(max_examples=200, deadline=None)
@given(round_trip_trees)
def test_flatten_unflatten_round_trip(tree):
    flat = tree_flatten(tree)
    assert same(tree_unflatten(flat), tree)
    assert same(tree_unflatten(dict(flat)), tree)
    assert same(tree_unflatten(flat), mu.tree_unflatten(mu.tree_flatten(tree)))


# -- worked examples ----------------------------------------------------------


class TinyNet(nn.Module):
    """A module tree shaped like a transformer: a list of blocks, a dict, a norm."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.layers = [{"q_proj": nn.Linear(8, 8, bias=False), "mlp": nn.Linear(8, 8)} for _ in range(3)]
        self.norm = nn.RMSNorm(8)


def test_round_trip_on_a_real_model():
    mx.random.seed(0)
    model = TinyNet()
    params = model.parameters()
    flat = tree_flatten(params)
    assert [k for k, _ in flat] == [k for k, _ in mu.tree_flatten(params)]
    assert "layers.2.q_proj.weight" in dict(flat)
    assert "layers.0.mlp.bias" in dict(flat)
    rebuilt = tree_unflatten(flat)
    assert isinstance(rebuilt["layers"], list) and len(rebuilt["layers"]) == 3
    assert same(rebuilt, tree_unflatten(mu.tree_flatten(params)))
    # Loading the rebuilt tree back into a fresh model gives identical outputs.
    other = TinyNet()
    other.update(rebuilt)
    x = mx.array([[1, 2, 3]])
    assert mx.array_equal(model.norm(model.embed_tokens(x)), other.norm(other.embed_tokens(x)))


def test_tree_map_on_model_parameters():
    model = TinyNet()
    half = tree_map(lambda p: p.astype(mx.float16), model.parameters())
    model.update(half)
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float16}
    # One SGD step written with tree_map over two trees.
    params = TinyNet().parameters()
    grads = tree_map(mx.ones_like, params)
    stepped = tree_map(lambda p, g: p - 0.5 * g, params, grads)
    for (_, p), (_, s) in zip(tree_flatten(params), tree_flatten(stepped)):
        assert mx.allclose(p - 0.5, s).item()


def test_flatten_prefix_drops_first_character():
    assert tree_flatten([[[0]]]) == [("0.0.0", 0)]
    assert tree_flatten([[[0]]], prefix=".hello") == [("hello.0.0.0", 0)]
    assert tree_flatten({"a": {"b": 1}}, destination={}) == {"a.b": 1}
    assert tree_flatten(5) == [("", 5)]
    assert tree_flatten({"a": [], "b": {}}) == []


def test_unflatten_examples():
    assert tree_unflatten([("hello.world", 42)]) == {"hello": {"world": 42}}
    assert tree_unflatten({"hello.world": 42}) == {"hello": {"world": 42}}
    assert tree_unflatten([("", 7)]) == 7
    assert tree_unflatten([]) == []
    # Numeric keys rebuild lists, gaps are filled with empty dicts.
    assert tree_unflatten([("layers.0.w", 1), ("layers.2.w", 3)]) == {"layers": [{"w": 1}, {}, {"w": 3}]}
    # "1" and "01" are different keys but the same integer: that level stays a dict.
    assert tree_unflatten([("1", "a"), ("01", "b")]) == {"1": "a", "01": "b"}


def test_tree_map_keeps_namedtuples_and_tuples():
    out = tree_map(lambda x: x * 10, Pair(1, (2, [3])))
    assert isinstance(out, Pair) and out == Pair(10, (20, [30]))
    assert isinstance(out.second, tuple) and isinstance(out.second[1], list)


def test_bad_destination_is_rejected():
    with pytest.raises(ValueError, match="destination"):
        tree_flatten({"a": 1}, destination=set())
