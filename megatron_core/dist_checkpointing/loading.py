"""``load``: read, from a checkpoint saved at any parallel layout, the slices this rank needs.

Each rank plans from ``metadata.json`` alone which stored slices its requested boxes overlap
(``planner.plan_reads``) and reads only those, straight into the tensors it returns (checksums
verified by tensorstore). Key problems are gathered over ranks, so every rank raises the same
error; a read failure on one rank makes every rank raise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_core.dist_checkpointing import comm
from megatron_core.dist_checkpointing.dict_utils import (
    build_factories,
    map_leaves,
    merge_factories,
    nonsharded_subtrees,
    replace_at,
    sharded_leaves,
)
from megatron_core.dist_checkpointing.direct_read import DirectReader
from megatron_core.dist_checkpointing.errors import CheckpointingError, MissingChunkError
from megatron_core.dist_checkpointing.mapping import ShardedObject, ShardedStateDict, ShardedTensor
from megatron_core.dist_checkpointing.metadata import CheckpointMetadata, read_metadata, torch_dtype
from megatron_core.dist_checkpointing.planner import ShardIndex
from megatron_core.dist_checkpointing.progress import Progress
from megatron_core.dist_checkpointing.tensorstore_io import TensorReader, check_chunk_files
from megatron_core.dist_checkpointing.torch_files import MISSING, read_common, read_object
from megatron_core.dist_checkpointing.validation import LoadProblems, StrictHandling, check_request, decide


def load(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir: str | os.PathLike[str],
    strict: StrictHandling | str = StrictHandling.RAISE,
    allow_dtype_cast: bool = False,
    *,
    allow_pickle: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Load the slices ``sharded_state_dict`` describes, from a checkpoint saved at any layout.

    Args:
        sharded_state_dict: what this rank needs (as from ``model.sharded_state_dict()``); the
            tensors' data is only used for shapes and is not modified.
        checkpoint_dir: a committed checkpoint.
        strict: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` missing keys (requested, not
            saved: the value passed in is kept) and unexpected keys (saved, requested by no rank);
            ``"raise_missing"`` raises on missing keys only (for partial loads, e.g. the model
            of a training checkpoint). Shape and dtype mismatches always raise.
        allow_dtype_cast: cast stored tensors to the requested dtype instead of raising.
        allow_pickle: load object files and the common state that need unpickling (only written
            by older versions; unpickling runs code from the file: only for trusted checkpoints).
            Without it such files raise ``UnsafeCheckpointError``; nothing is ever unpickled.
        progress: a tqdm bar on rank 0 for loads over ~2 s when stderr is a terminal; None: on
            unless ``$MCORE_CKPT_PROGRESS=0``.

    Returns:
        The same nested structure with each ``ShardedTensor`` replaced by the loaded local tensor,
        each factory by its merged tensor, each ``ShardedObject`` by its data, and other leaves by
        the saved value at the same place (or kept). Ready for ``model.load_state_dict``.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, UnsupportedFormatVersionError,
        CheckpointMismatchError (MissingKeyError, UnexpectedKeyError, ShapeMismatchError,
        DTypeMismatchError when only one kind of problem), MissingChunkError,
        CorruptedCheckpointError (names the file, and key), UnsafeCheckpointError. Every rank
        raises when any rank fails.
    """
    return _load(sharded_state_dict, Path(checkpoint_dir), StrictHandling(strict), allow_dtype_cast, collective=True,
                 allow_pickle=allow_pickle, progress=progress)


def _load(sharded_state_dict: ShardedStateDict, path: Path, strict: StrictHandling, allow_dtype_cast: bool,
          collective: bool, allow_pickle: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """``load``; with ``collective=False`` this rank loads alone (no collectives, no global key check)."""
    gather = comm.all_gather_object if collective else (lambda obj: [obj])
    metadata = read_metadata(path)
    built = build_factories(sharded_state_dict)
    leaves = sharded_leaves(built)
    problems = check_request(metadata, [leaf for _, leaf in leaves], str(path), allow_dtype_cast)
    merged = LoadProblems()
    for other in gather(problems):
        merged.merge(other)
    decide(merged, metadata, str(path), strict)

    error: BaseException | None = None
    loaded: dict[Any, Any] = {}
    try:
        loaded = _read_all(path, metadata, leaves, allow_dtype_cast, allow_pickle, progress)
        if nonsharded_subtrees(sharded_state_dict):
            loaded["__nonsharded__"] = read_common(path, metadata, allow_pickle)["nonsharded"]
    except CheckpointingError as e:
        error = e
    errors = gather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        if error is not None:
            raise error
        rank, first = failed[0]
        raise type(first)(f"rank {rank} failed to load: {first}")

    nonsharded = loaded.pop("__nonsharded__", {})

    def fill(p: Any, leaf: Any) -> Any:
        return loaded.get(p, leaf.data) if isinstance(leaf, (ShardedTensor, ShardedObject)) else leaf

    result = merge_factories(sharded_state_dict, map_leaves(built, fill))
    for p, value in nonsharded.items():  # saved non-sharded state, where the request has a place for it
        result = replace_at(result, p, value)
    return result


def _read_all(path: Path, metadata: CheckpointMetadata, leaves: Sequence[tuple[Any, Any]],
              allow_dtype_cast: bool, allow_pickle: bool, progress: bool | None) -> dict[Any, Any]:
    """Read every requested tensor slice and object shard of this rank (path in tree -> value)."""
    total = sum(math.prod(leaf.local_shape) * torch.empty((), dtype=leaf.dtype).element_size()
                for _, leaf in leaves if isinstance(leaf, ShardedTensor))
    with Progress(f"load {path.name}", total, progress) as bar:
        return _read_all_into(path, metadata, leaves, allow_dtype_cast, allow_pickle, bar)


def _read_all_into(path: Path, metadata: CheckpointMetadata, leaves: Sequence[tuple[Any, Any]],
                   allow_dtype_cast: bool, allow_pickle: bool, bar: Progress) -> dict[Any, Any]:
    reader = TensorReader(path, on_bytes=bar.update)
    direct = DirectReader(path, on_bytes=bar.update)  # whole chunks, straight into place
    out: dict[Any, Any] = {}
    try:
        for tree_path, leaf in leaves:
            if isinstance(leaf, ShardedObject):
                obj = read_object(path, metadata, leaf, allow_pickle)
                if obj is not MISSING:
                    out[tree_path] = obj
                continue
            record = metadata.tensors.get(leaf.key)
            if record is None:
                continue  # missing key, tolerated by ``strict``
            shards = record.shards
            plan = ShardIndex([s.offset for s in shards], [s.shape for s in shards]).plan(
                leaf.global_offset, leaf.full_local_shape)
            padded = leaf.allow_shape_mismatch and tuple(record.global_shape) != tuple(leaf.global_shape)
            if plan.uncovered and not padded:
                raise MissingChunkError(f"{leaf.key}: {str(path)!r} lists no shard for {plan.uncovered}; the "
                                        "metadata is inconsistent, the checkpoint is damaged")
            # allow_shape_mismatch: what the stored tensor does not cover stays zero
            tensor = (torch.zeros if plan.uncovered else torch.empty)(leaf.full_local_shape,
                                                                       dtype=torch_dtype(record.dtype))
            rest = [item for item in plan.items if not direct.try_read(leaf.key, record, tensor, item)]
            if rest:
                check_chunk_files(path, leaf.key, record, [item.global_box for item in rest])
                reader.read_into(leaf.key, record, tensor, rest)
            out[tree_path] = tensor
        reader.finish()
    finally:
        direct.finish()  # no read may still write into a tensor once this returns; raises the first failure
    for tree_path, leaf in leaves:
        if isinstance(leaf, ShardedTensor) and tree_path in out:
            loaded = out[tree_path].reshape(leaf.local_shape)  # drop the prepended axes
            if loaded.dtype != leaf.dtype:
                assert allow_dtype_cast  # otherwise check_request reported it
                loaded = loaded.to(leaf.dtype)
            out[tree_path] = loaded
    return out


# ------------------------------------------------------------------------------------ inspect
def load_common_state_dict(checkpoint_dir: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, Any]:
    """The ``common_state_dict`` given to ``save`` ({} if none); ``allow_pickle`` as for ``load``."""
    path = Path(checkpoint_dir)
    return read_common(path, read_metadata(path), allow_pickle)["common"]


def load_tensors_metadata(checkpoint_dir: str | os.PathLike[str]) -> dict[str, ShardedTensor]:
    """Every stored tensor as a data-less ``ShardedTensor`` covering the whole global tensor.

    ``axis_fragmentations`` is the saved chunk grid (how the saving run split each axis).
    """
    metadata = read_metadata(checkpoint_dir)
    out = {}
    for key, rec in metadata.tensors.items():
        grid = tuple(math.ceil(g / c) if g else 1 for g, c in zip(rec.global_shape, rec.chunk_shape, strict=True))
        out[key] = ShardedTensor(key=key, data=None, dtype=torch_dtype(rec.dtype), local_shape=rec.global_shape,
                                 global_shape=rec.global_shape, global_offset=(0,) * len(rec.global_shape),
                                 axis_fragmentations=grid)
    return out


def load_sharded_metadata(checkpoint_dir: str | os.PathLike[str]) -> dict[str, ShardedTensor | ShardedObject]:
    """``load_tensors_metadata`` plus every stored object shard (keyed by ``unique_key``)."""
    out: dict[str, ShardedTensor | ShardedObject] = dict(load_tensors_metadata(checkpoint_dir))
    for key, rec in read_metadata(checkpoint_dir).objects.items():
        for shard in rec.shards:
            obj = ShardedObject(key, None, tuple(rec.global_shape), tuple(shard.offset))
            out[obj.unique_key] = obj
    return out


def load_plain_tensors(checkpoint_dir: str | os.PathLike[str], keys: Sequence[str] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Whole global tensors (all of them, or ``keys``), e.g. for conversion or inspection."""
    wanted = load_tensors_metadata(checkpoint_dir)
    if keys is not None:
        wanted = {k: wanted[k] for k in keys}
    return _load(wanted, Path(checkpoint_dir), StrictHandling.IGNORE, False, collective=False)
