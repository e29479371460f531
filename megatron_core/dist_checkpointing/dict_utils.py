"""Walking nested (sharded) state dicts: dicts, lists and tuples with arbitrary leaves."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from megatron_core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

Path = tuple[Any, ...]  # dict keys / list indices from the root to a leaf
SHARDED_TYPES = (ShardedTensor, ShardedObject, ShardedTensorFactory)


def iter_leaves(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every leaf; containers are dicts, lists and tuples."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_leaves(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from iter_leaves(v, (*path, i))
    else:
        yield path, tree


def map_leaves(tree: Any, fn: Callable[[Path, Any], Any], path: Path = ()) -> Any:
    """A copy of the tree's containers with every leaf replaced by ``fn(path, leaf)``."""
    if isinstance(tree, dict):
        return {k: map_leaves(v, fn, (*path, k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_leaves(v, fn, (*path, i)) for i, v in enumerate(tree)]
    if isinstance(tree, tuple):
        return tuple(map_leaves(v, fn, (*path, i)) for i, v in enumerate(tree))
    return fn(path, tree)


def format_path(path: Path) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def build_factories(tree: Any) -> Any:
    """The tree with every ``ShardedTensorFactory`` replaced by what ``build()`` returns.

    The factories themselves are kept by the caller (same paths in the original tree) for merging.
    A factory's ``build()`` must return ShardedTensors (in any container), not further factories.
    """
    def build(_: Path, leaf: Any) -> Any:
        return leaf.build() if isinstance(leaf, ShardedTensorFactory) else leaf
    return map_leaves(tree, build)


def sharded_leaves(tree: Any) -> list[tuple[Path, ShardedTensor | ShardedObject]]:
    """(path, leaf) of every ShardedTensor / ShardedObject of a tree whose factories are built."""
    return [(p, v) for p, v in iter_leaves(tree) if isinstance(v, (ShardedTensor, ShardedObject))]


def merge_factories(original: Any, loaded_built: Any) -> Any:
    """Undo ``build_factories`` on a loaded tree: each factory's subtree goes through ``merge_fn``."""
    if isinstance(original, ShardedTensorFactory):
        return original.merge_fn(loaded_built)
    if isinstance(original, dict):
        return {k: merge_factories(v, loaded_built[k]) for k, v in original.items()}
    if isinstance(original, list):
        return [merge_factories(v, lv) for v, lv in zip(original, loaded_built, strict=True)]
    if isinstance(original, tuple):
        return tuple(merge_factories(v, lv) for v, lv in zip(original, loaded_built, strict=True))
    return loaded_built


def has_sharded(tree: Any) -> bool:
    return any(isinstance(leaf, SHARDED_TYPES) for _, leaf in iter_leaves(tree))


def nonsharded_subtrees(tree: Any, path: Path = ()) -> dict[Path, Any]:
    """The largest subtrees holding no sharded leaf, by path (the state ``save`` stores once)."""
    if not has_sharded(tree):
        return {path: tree}
    out: dict[Path, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(nonsharded_subtrees(v, (*path, k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(nonsharded_subtrees(v, (*path, i)))
    return out


def replace_at(tree: Any, path: Path, value: Any) -> Any:
    """``tree`` with the value at ``path`` replaced, if that path exists (tuples are rebuilt)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict) and head in tree:
        tree[head] = replace_at(tree[head], rest, value)
    elif isinstance(tree, list) and isinstance(head, int) and 0 <= head < len(tree):
        tree[head] = replace_at(tree[head], rest, value)
    elif isinstance(tree, tuple) and isinstance(head, int) and 0 <= head < len(tree):
        tree = (*tree[:head], replace_at(tree[head], rest, value), *tree[head + 1:])
    return tree
