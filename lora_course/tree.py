"""Tree utilities: walk, flatten and rebuild the nested containers that hold a model.

An MLX model keeps its parameters in a *tree*: dicts (an ``mlx.nn.Module`` is a
dict subclass), lists (``model.layers``) and tuples, nested to any depth, with
arrays at the leaves. Three small functions are all we need to work with such
trees:

- ``tree_map(fn, tree, *rest)`` applies ``fn`` to every leaf and returns a tree of
  the same shape (used to cast, quantize or zero every parameter at once);
- ``tree_flatten(tree)`` turns the tree into ``[(dotted_key, leaf), ...]`` with keys
  like ``"model.layers.0.self_attn.q_proj.weight"``, the names checkpoints use;
- ``tree_unflatten(items)`` turns such pairs back into the nested tree; a level
  whose keys are all integers becomes a list.

They behave exactly like ``mlx.utils.tree_map``, ``tree_flatten`` and
``tree_unflatten`` (the property tests in ``tests/test_tree.py`` compare them on
generated trees); we write them ourselves because building them is the lesson.
There is no paper here: this is the JAX "pytree" idea in its plainest form.

Taught in notebook 01 (``notebooks/01_tree_utilities.ipynb``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, Optional, Union

Leaf = Any
FlatTree = Union[list[tuple[str, Any]], dict[str, Any]]

__all__ = ["tree_map", "tree_flatten", "tree_unflatten"]


def tree_map(fn: Callable, tree: Any, *rest: Any, is_leaf: Optional[Callable] = None) -> Any:
    """Apply ``fn`` to every leaf of ``tree`` and return a tree of the same shape.

    Each tree in ``rest`` must contain ``tree``'s structure (it may hold more);
    its matching leaves are passed to ``fn`` as extra arguments, so
    ``tree_map(lambda p, g: p - lr * g, params, grads)`` is one SGD step.
    ``is_leaf(node) -> bool`` can stop the descent early at any node.

    Lists, tuples and namedtuples keep their type; dicts come back as plain dicts.
    """
    if is_leaf is not None and is_leaf(tree):
        return fn(tree, *rest)
    if isinstance(tree, (list, tuple)):
        children = [
            tree_map(fn, child, *(r[i] for r in rest), is_leaf=is_leaf) for i, child in enumerate(tree)
        ]
        if hasattr(tree, "_fields"):  # a namedtuple takes its fields positionally
            return type(tree)(*children)
        return type(tree)(children)
    if isinstance(tree, dict):
        return {
            key: tree_map(fn, child, *(r[key] for r in rest), is_leaf=is_leaf) for key, child in tree.items()
        }
    return fn(tree, *rest)  # anything that is not a container is a leaf


def tree_flatten(
    tree: Any,
    prefix: str = "",
    is_leaf: Optional[Callable] = None,
    destination: Optional[FlatTree] = None,
) -> FlatTree:
    """Flatten ``tree`` into ``[(dotted_key, leaf), ...]`` in depth-first order.

    List and tuple positions become numbers in the key, dict keys are used as
    they are: ``{"layers": [{"w": x}]}`` gives ``[("layers.0.w", x)]``.

    ``prefix`` is prepended to every key, and its first character is always
    dropped (it stands for the separator), so ``prefix=".model"`` yields keys
    ``"model.…"``. ``destination`` may be a list (pairs are appended) or a dict
    (pairs are inserted, giving ``{dotted_key: leaf}``); it is returned.
    Empty containers contribute nothing.
    """
    if destination is None:
        destination = []
    if isinstance(destination, list):
        add = destination.append
    elif isinstance(destination, dict):
        add = lambda pair: destination.__setitem__(*pair)  # noqa: E731
    else:
        raise ValueError(
            f"tree_flatten: destination must be a list, a dict or None, got {type(destination).__name__}"
        )

    def walk(node: Any, key: str) -> None:
        # `key` always starts with the separator (or the caller's first character).
        if is_leaf is not None and is_leaf(node):
            add((key[1:], node))
        elif isinstance(node, (list, tuple)):
            for i, child in enumerate(node):
                walk(child, f"{key}.{i}")
        elif isinstance(node, dict):
            for name, child in node.items():
                walk(child, f"{key}.{name}")
        else:
            add((key[1:], node))

    walk(tree, prefix)
    return destination


def tree_unflatten(items: FlatTree) -> Any:
    """Rebuild a nested tree from ``[(dotted_key, leaf), ...]`` or ``{dotted_key: leaf}``.

    The inverse of :func:`tree_flatten`. At each level the keys are split at the
    first dot; when every head at a level is an integer the level becomes a list
    (ordered by that integer, missing positions filled with ``{}``), otherwise a
    dict in first-seen order. A single pair with key ``""`` is a bare leaf.
    """
    pairs = items.items() if isinstance(items, dict) else items

    if len(pairs) == 1:
        key, value = next(iter(pairs))
        if key == "":
            return value

    # Group by the first key component: "layers.0.w" -> children["layers"] gets ("0.w", leaf).
    children: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for key, value in pairs:
        head, _, tail = key.partition(".")
        children[head].append((tail, value))

    # A level is a list when every head parses as an integer and no two heads
    # name the same integer ("1" and "01" would collide, so that stays a dict).
    try:
        index_of = {int(head): head for head in children}
    except ValueError:
        index_of = None
    if index_of is None or len(index_of) != len(children):
        return {head: tree_unflatten(sub) for head, sub in children.items()}

    rebuilt: list[Any] = []
    for index, head in sorted(index_of.items()):
        while len(rebuilt) < index:  # a gap in the numbering: fill it like mlx does
            rebuilt.append({})
        rebuilt.append(tree_unflatten(children[head]))
    return rebuilt
