"""``save`` of sharded state dicts (``load`` and the inspection functions live in ``loading.py``
and are re-exported here: this module is the public save/load API).

Save protocol (every rank calls ``save`` with its own sharded state dict):

1. Each rank describes its shards; rank 0 checks the target and makes ``<dir>.tmp-<id>`` beside
   it. One ``all_gather_object`` shares both, and every rank validates the union: each key's main
   replicas must tile its global shape exactly once. Any problem: every rank raises, nothing is
   written.
2. Each main replica writes its chunks and fsyncs every file it wrote, then its key directories
   (``write_shards``); rank 0 writes the common state. Directories are fsync'd.
3. A second ``all_gather_object`` is the barrier and the success vote: if any rank failed, every
   rank raises and the temporary directory is removed.
4. Rank 0 writes ``metadata.json`` (the commit marker) last, then renames the directory into place;
   when overwriting, the old and new directories are swapped atomically (``renameat2``), so there
   is always a complete checkpoint at the target. Every rank waits for the commit.

"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_core.dist_checkpointing import comm
from megatron_core.dist_checkpointing.dict_utils import (
    build_factories,
    nonsharded_subtrees,
    sharded_leaves,
)
from megatron_core.dist_checkpointing.errors import (
    CheckpointExistsError,
    CheckpointingError,
    SaveFailedError,
    ShardingValidationError,
)
from megatron_core.dist_checkpointing.loading import (
    load,
    load_common_state_dict,
    load_plain_tensors,
    load_sharded_metadata,
    load_tensors_metadata,
)
from megatron_core.dist_checkpointing.mapping import ShardedObject, ShardedStateDict, ShardedTensor
from megatron_core.dist_checkpointing.metadata import (
    COMMON_FILE,
    METADATA_FILE,
    OBJECTS_DIR,
    CheckpointMetadata,
    CommonRecord,
    ObjectRecord,
    ObjectShardRecord,
    ShardRecord,
    TensorRecord,
    fsync_dir,
    storage_name,
    torch_dtype,
    write_metadata,
)
from megatron_core.dist_checkpointing.planner import (
    box_of,
    choose_chunk_shape,
    choose_inner_chunk_shape,
)
from megatron_core.dist_checkpointing.rename import commit_directory
from megatron_core.dist_checkpointing.tensorstore_io import (
    WriteItem,
    write_shards,
)
from megatron_core.dist_checkpointing.torch_files import write_torch_file
from megatron_core.dist_checkpointing.validation import (
    ShardDesc,
    describe_for_save,
    validate_global,
)

__all__ = ["load", "load_common_state_dict", "load_plain_tensors", "load_sharded_metadata",
           "load_tensors_metadata", "save"]
logger = logging.getLogger(__name__)


# ============================================================================================ save
def save(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir: str | os.PathLike[str],
    *,
    common_state_dict: dict[str, Any] | None = None,
    overwrite: bool = False,
    parallel_sizes: dict[str, int] | None = None,
) -> None:
    """Save a (nested) sharded state dict; every rank calls this with its own shards.

    Args:
        sharded_state_dict: nested dicts/lists of ``ShardedTensor``, ``ShardedObject`` and
            ``ShardedTensorFactory``; other leaves are stored once (by rank 0) and handed back by
            ``load`` at the same place.
        checkpoint_dir: the directory to create. It must not exist, be empty, or (with
            ``overwrite``) hold a committed checkpoint.
        common_state_dict: non-sharded state (iteration, config, scheduler), saved once by rank 0;
            read back with ``load_common_state_dict``. Must be ``torch.load(weights_only=True)``
            loadable to be loaded without unpickling code (checked; otherwise flagged).
        overwrite: replace an existing committed checkpoint (atomically).
        parallel_sizes: recorded in the metadata; default: the sizes from ``parallel_state``.

    Raises:
        ShardingValidationError: the shards do not tile their tensors exactly once (all problems).
        CheckpointExistsError: the target exists and ``overwrite`` is not set.
        SaveFailedError: some rank failed to write; nothing was committed.
    """
    target = Path(os.path.abspath(checkpoint_dir))
    me = comm.rank()
    built = build_factories(sharded_state_dict)
    leaves = [leaf for _, leaf in sharded_leaves(built)]
    descs, local_problems = describe_for_save(leaves, me)
    prep: Any = _prepare_target(target, overwrite) if me == 0 else None
    gathered = comm.all_gather_object((descs, local_problems, prep))

    prep = gathered[0][2]
    all_descs = [d for g in gathered for d in g[0]]
    problems = [p for g in gathered for p in g[1]] + validate_global(all_descs)
    if isinstance(prep, BaseException):
        raise prep
    tmp = Path(prep)
    if problems:
        if me == 0:
            _remove_uncommitted(tmp)
        raise ShardingValidationError(
            f"cannot save {str(target)!r}: {len(problems)} problem(s) with the sharded state dict; nothing "
            "was written:\n  " + "\n  ".join(problems)
        )
    records = _tensor_records(all_descs)
    object_paths = _object_paths(all_descs)
    common = {"common": common_state_dict or {}, "nonsharded": nonsharded_subtrees(sharded_state_dict)}
    status = _write_local(tmp, me, leaves, records, object_paths, common if me == 0 else None)
    statuses = comm.all_gather_object(status)

    failed = [(r, s) for r, s in enumerate(statuses) if not s.ok]
    if failed:
        if me == 0:
            _remove_uncommitted(tmp)
        raise SaveFailedError(
            f"saving {str(target)!r} failed on {len(failed)} rank(s); nothing was committed:\n  "
            + "\n  ".join(f"rank {r}: {s.error}" for r, s in failed)
        )
    commit_error = None
    if me == 0:
        try:
            metadata = _build_metadata(records, object_paths, statuses, parallel_sizes)
            write_metadata(tmp, metadata)
            commit_directory(tmp, target)
        except Exception as e:  # reported to every rank below
            commit_error = f"{type(e).__name__}: {e}"
            _remove_uncommitted(tmp)
    commit_error = comm.broadcast_object(commit_error)
    if commit_error is not None:
        raise SaveFailedError(f"committing {str(target)!r} failed on rank 0: {commit_error}")
    logger.info("saved checkpoint %s (%d tensors, %d objects)", target, len(records), len(object_paths))


@dataclass
class _Status:
    ok: bool
    error: str = ""
    object_weights_only: dict[str, bool] = field(default_factory=dict)  # object path -> flag
    common_weights_only: bool | None = None


def _prepare_target(target: Path, overwrite: bool) -> str | BaseException:
    """Rank 0: check the target and create the temporary directory beside it."""
    try:
        if target.exists():
            if not target.is_dir():
                return CheckpointExistsError(f"{str(target)!r} exists and is not a directory; choose another path")
            entries = os.listdir(target)
            committed = METADATA_FILE in entries
            if entries and not committed:
                return CheckpointExistsError(
                    f"{str(target)!r} exists, is not empty and is not a committed checkpoint (no {METADATA_FILE}); "
                    "refusing to replace it. Remove it or choose another path."
                )
            if committed and not overwrite:
                return CheckpointExistsError(
                    f"{str(target)!r} already holds a checkpoint; pass overwrite=True to replace it (the old one "
                    "is kept until the new one is committed) or choose another path."
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        return str(tmp)
    except OSError as e:
        return CheckpointingError(f"cannot prepare {str(target)!r} for saving: {e}")


def _remove_uncommitted(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _tensor_records(descs: Sequence[ShardDesc]) -> dict[str, TensorRecord]:
    """Storage layout of every key, computed identically on every rank from the gathered shards."""
    mains: dict[str, list[ShardDesc]] = {}
    for d in descs:
        if not d.is_object and d.main:
            mains.setdefault(d.key, []).append(d)
    records = {}
    for key in sorted(mains):
        shards = sorted(mains[key], key=lambda d: d.offset)
        global_shape = shards[0].global_shape
        boxes = [box_of(d.offset, d.shape) for d in shards]
        chunk = choose_chunk_shape(global_shape, boxes)
        split_axes = [a for a, (c, g) in enumerate(zip(chunk, global_shape, strict=True)) if c < g]
        itemsize = torch.empty((), dtype=torch_dtype(str(shards[0].dtype))).element_size()
        records[key] = TensorRecord(
            path=storage_name(key), global_shape=global_shape, dtype=str(shards[0].dtype), chunk_shape=chunk,
            inner_chunk_shape=choose_inner_chunk_shape(chunk, itemsize, split_axes),
            shards=[ShardRecord(offset=d.offset, shape=d.shape, rank=d.rank) for d in shards],
        )
    return records


def _object_paths(descs: Sequence[ShardDesc]) -> dict[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...], int]]:
    """(key, offset) -> (relative file path, global shape, writing rank) for every main object shard."""
    out = {}
    for d in descs:
        if d.is_object and d.main:
            name = "shard_" + "_".join(str(o) for o in d.offset) + ".pt"
            out[(d.key, d.offset)] = (f"{OBJECTS_DIR}/{storage_name(d.key)}/{name}", d.global_shape, d.rank)
    return out


def _write_local(tmp: Path, me: int, leaves: Sequence[ShardedTensor | ShardedObject],
                 records: dict[str, TensorRecord], object_paths: dict, common: dict | None) -> _Status:
    """Write this rank's main replicas (and rank 0's common state); never raises."""
    status = _Status(ok=True)
    try:
        items = []
        for leaf in leaves:
            if isinstance(leaf, ShardedTensor) and leaf.is_main_replica:
                assert leaf.data is not None  # checked in describe_for_save
                data = leaf.data.reshape(leaf.full_local_shape)  # add the prepended axes
                items.append(WriteItem(leaf.key, records[leaf.key], leaf.global_offset, data,
                                       create=not any(leaf.global_offset)))
        write_shards(tmp, items)
        for leaf in leaves:
            if isinstance(leaf, ShardedObject) and leaf.is_main_replica:
                rel = object_paths[(leaf.key, tuple(leaf.global_offset))][0]
                status.object_weights_only[rel] = write_torch_file(tmp / rel, leaf.data)
        if common is not None:
            status.common_weights_only = write_torch_file(tmp / COMMON_FILE, common)
        fsync_dir(tmp)  # the key directories' entries (write_shards fsyncs inside each key directory)
    except Exception as e:  # every rank learns of it through the vote
        logger.exception("rank %d failed while saving into %s", me, tmp)
        status = _Status(ok=False, error=f"{type(e).__name__}: {e}")
    return status


def _build_metadata(records: dict[str, TensorRecord], object_paths: dict, statuses: Sequence[_Status],
                    parallel_sizes: dict[str, int] | None) -> CheckpointMetadata:
    flags = {path: flag for s in statuses for path, flag in s.object_weights_only.items()}
    objects: dict[str, ObjectRecord] = {}
    for (key, offset), (rel, global_shape, rank) in sorted(object_paths.items()):
        rec = objects.setdefault(key, ObjectRecord(global_shape=global_shape, shards=[]))
        rec.shards.append(ObjectShardRecord(offset=offset, path=rel, rank=rank, weights_only=flags[rel]))
    common_flag = statuses[0].common_weights_only
    return CheckpointMetadata(
        world_size=comm.world_size(),
        parallel_sizes=parallel_sizes if parallel_sizes is not None else _default_parallel_sizes(),
        common=CommonRecord(path=COMMON_FILE, weights_only=common_flag) if common_flag is not None else None,
        tensors=records,
        objects=objects,
    )


def _default_parallel_sizes() -> dict[str, int]:
    from megatron_core import parallel_state

    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size()
        if parallel_state.model_parallel_is_initialized() else comm.world_size(),
    }
