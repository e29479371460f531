"""``save`` and ``load`` of sharded state dicts (any parallel layout in, any parallel layout out).

Save protocol (every rank calls ``save`` with its own sharded state dict):

1. Each rank describes its shards; rank 0 checks the target and makes ``<dir>.tmp-<id>`` beside
   it. One ``all_gather_object`` shares both, and every rank validates the union: each key's main
   replicas must tile its global shape exactly once. Any problem: every rank raises, nothing is
   written.
2. Each main replica writes its chunks (tensorstore fsyncs every file); rank 0 writes the common
   state. Directories are fsync'd.
3. A second ``all_gather_object`` is the barrier and the success vote: if any rank failed, every
   rank raises and the temporary directory is removed.
4. Rank 0 writes ``metadata.json`` (the commit marker) last, then renames the directory into place;
   when overwriting, the old and new directories are swapped atomically (``renameat2``), so there
   is always a complete checkpoint at the target. Every rank waits for the commit.

Load: each rank plans, from ``metadata.json`` alone, which stored slices its requested boxes need
and reads only those (checksums verified by tensorstore). Key problems are gathered over ranks so
that every rank raises the same error.
"""

from __future__ import annotations

import io
import logging
import math
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
    map_leaves,
    merge_factories,
    nonsharded_subtrees,
    replace_at,
    sharded_leaves,
)
from megatron_core.dist_checkpointing.errors import (
    CheckpointExistsError,
    CheckpointingError,
    CorruptedCheckpointError,
    MissingChunkError,
    SaveFailedError,
    ShardingValidationError,
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
    read_metadata,
    storage_name,
    torch_dtype,
    write_metadata,
)
from megatron_core.dist_checkpointing.planner import (
    box_of,
    choose_chunk_shape,
    choose_inner_chunk_shape,
    plan_reads,
)
from megatron_core.dist_checkpointing.rename import commit_directory
from megatron_core.dist_checkpointing.tensorstore_io import (
    TensorReader,
    WriteItem,
    check_chunk_files,
    write_shards,
)
from megatron_core.dist_checkpointing.validation import (
    LoadProblems,
    ShardDesc,
    StrictHandling,
    check_request,
    decide,
    describe_for_save,
    validate_global,
)

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
                status.object_weights_only[rel] = _write_torch_file(tmp / rel, leaf.data)
        if common is not None:
            status.common_weights_only = _write_torch_file(tmp / COMMON_FILE, common)
        fsync_dir(tmp)  # the key directories' entries (tensorstore fsyncs each key directory)
    except Exception as e:  # every rank learns of it through the vote
        logger.exception("rank %d failed while saving into %s", me, tmp)
        status = _Status(ok=False, error=f"{type(e).__name__}: {e}")
    return status


def _write_torch_file(path: Path, obj: Any) -> bool:
    """``torch.save`` durably; returns whether it loads with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
        weights_only = True
    except Exception:
        weights_only = False
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    if created:
        fsync_dir(path.parent.parent)
        fsync_dir(path.parent.parent.parent)
    return weights_only


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


# ============================================================================================ load
def load(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir: str | os.PathLike[str],
    strict: StrictHandling | str = StrictHandling.RAISE,
    allow_dtype_cast: bool = False,
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

    Returns:
        The same nested structure with each ``ShardedTensor`` replaced by the loaded local tensor,
        each factory by its merged tensor, each ``ShardedObject`` by its data, and other leaves by
        the saved value at the same place (or kept). Ready for ``model.load_state_dict``.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, UnsupportedFormatVersionError,
        CheckpointMismatchError (MissingKeyError, UnexpectedKeyError, ShapeMismatchError,
        DTypeMismatchError when only one kind of problem), MissingChunkError,
        CorruptedCheckpointError. Every rank raises when any rank fails.
    """
    return _load(sharded_state_dict, Path(checkpoint_dir), StrictHandling(strict), allow_dtype_cast, collective=True)


def _load(sharded_state_dict: ShardedStateDict, path: Path, strict: StrictHandling, allow_dtype_cast: bool,
          collective: bool) -> dict[str, Any]:
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
        loaded = _read_all(path, metadata, leaves, allow_dtype_cast)
        if nonsharded_subtrees(sharded_state_dict):
            loaded["__nonsharded__"] = _read_common(path, metadata)["nonsharded"]
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
              allow_dtype_cast: bool) -> dict[Any, Any]:
    """Read every requested tensor slice and object shard of this rank (path in tree -> value)."""
    reader = TensorReader(path)
    out: dict[Any, Any] = {}
    for tree_path, leaf in leaves:
        if isinstance(leaf, ShardedObject):
            obj = _read_object(path, metadata, leaf)
            if obj is not _MISSING:
                out[tree_path] = obj
            continue
        record = metadata.tensors.get(leaf.key)
        if record is None:
            continue  # missing key, tolerated by ``strict``
        plan = plan_reads(leaf.global_offset, leaf.full_local_shape, [box_of(s.offset, s.shape) for s in record.shards])
        padded = leaf.allow_shape_mismatch and tuple(record.global_shape) != tuple(leaf.global_shape)
        if plan.uncovered and not padded:
            raise MissingChunkError(f"{leaf.key}: {str(path)!r} lists no shard for {plan.uncovered}; the metadata "
                                    "is inconsistent, the checkpoint is damaged")
        check_chunk_files(path, leaf.key, record, [item.global_box for item in plan.items])
        # allow_shape_mismatch: what the stored tensor does not cover stays zero
        tensor = (torch.zeros if plan.uncovered else torch.empty)(leaf.full_local_shape, dtype=torch_dtype(record.dtype))
        reader.read_into(leaf.key, record, tensor, plan.items)
        out[tree_path] = tensor
    reader.finish()
    for tree_path, leaf in leaves:
        if isinstance(leaf, ShardedTensor) and tree_path in out:
            loaded = out[tree_path].reshape(leaf.local_shape)  # drop the prepended axes
            if loaded.dtype != leaf.dtype:
                assert allow_dtype_cast  # otherwise check_request reported it
                loaded = loaded.to(leaf.dtype)
            out[tree_path] = loaded
    return out


_MISSING = object()


def _read_object(path: Path, metadata: CheckpointMetadata, leaf: ShardedObject) -> Any:
    record = metadata.objects.get(leaf.key)
    shard = next((s for s in record.shards if tuple(s.offset) == tuple(leaf.global_offset)), None) if record else None
    if shard is None:
        return _MISSING
    return read_torch_file(path / shard.path, shard.weights_only, leaf.key)


def read_torch_file(file: Path, weights_only: bool, what: str) -> Any:
    if not file.is_file():
        raise MissingChunkError(f"{what}: file {str(file)!r} listed in {METADATA_FILE} is missing; the checkpoint is "
                                "damaged")
    try:
        # Objects that were not weights_only-loadable when saved (e.g. NumPy RNG state) need full
        # unpickling, as with torch.load: load checkpoints only from sources you trust.
        return torch.load(file, weights_only=weights_only)
    except Exception as e:
        raise CorruptedCheckpointError(f"{what}: cannot read {str(file)!r}: {type(e).__name__}: {e}") from e


def _read_common(path: Path, metadata: CheckpointMetadata) -> dict[str, Any]:
    if metadata.common is None:
        return {"common": {}, "nonsharded": {}}
    return read_torch_file(path / metadata.common.path, metadata.common.weights_only, "common state")


# ============================================================================================ inspect
def load_common_state_dict(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``common_state_dict`` given to ``save`` ({} if none)."""
    path = Path(checkpoint_dir)
    return _read_common(path, read_metadata(path))["common"]


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
