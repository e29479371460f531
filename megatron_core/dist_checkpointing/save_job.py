"""One save, in two phases: ``plan_save`` (collective, in the caller) and ``SaveJob.run``
(write, vote, commit: in the caller for ``save``, in a background thread for ``async_save``).

Every collective runs on the checkpoint group (``comm.checkpoint_group``): its own gloo group with
its own timeout. A collective that fails (a rank died, or the timeout passed) raises
``SaveFailedError`` naming this rank and the phase; rank 0 then removes the temporary directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core.dist_checkpointing import comm
from megatron_core.dist_checkpointing.checksums import crc32c
from megatron_core.dist_checkpointing.dict_utils import build_factories, nonsharded_subtrees, sharded_leaves
from megatron_core.dist_checkpointing.errors import (
    CheckpointExistsError,
    CheckpointingError,
    SaveFailedError,
    ShardingValidationError,
    UnsafeCheckpointError,
)
from megatron_core.dist_checkpointing.mapping import ShardedObject, ShardedStateDict, ShardedTensor
from megatron_core.dist_checkpointing.metadata import (
    COMMON_FILE,
    METADATA_FILE,
    CheckpointMetadata,
    CommonRecord,
    ObjectRecord,
    ObjectShardRecord,
    fsync_dir,
    write_metadata,
)
from megatron_core.dist_checkpointing.plan_cache import PlanCache, SavePlan
from megatron_core.dist_checkpointing.progress import Progress
from megatron_core.dist_checkpointing.rename import commit_directory
from megatron_core.dist_checkpointing.tensorstore_io import WriteItem, write_shards
from megatron_core.dist_checkpointing.torch_files import serialize, write_file
from megatron_core.dist_checkpointing.validation import describe_for_save

logger = logging.getLogger(__name__)
_plan_cache = PlanCache()


@dataclass
class _Status:
    ok: bool
    error: str = ""
    object_crc: dict[str, int] = field(default_factory=dict)  # relative path -> crc32c
    common_crc: int | None = None
    zarr_json_crc: dict[str, int] = field(default_factory=dict)  # key -> crc32c of its zarr.json


@dataclass
class SaveJob:
    """Everything this rank writes, decided by ``plan_save``; ``run`` does the rest of the protocol."""

    target: Path
    tmp: Path
    rank: int
    group: ProcessGroup | None
    plan: SavePlan
    tensors: list[WriteItem]
    objects: dict[str, bytes]  # relative path -> torch.save bytes (serialised at the call: a snapshot)
    common: bytes | None  # rank 0 only
    parallel_sizes: dict[str, int]
    progress: Progress = field(default_factory=lambda: Progress("save", 0, enabled=False))

    @property
    def nbytes(self) -> int:
        return sum(item.data.numel() * item.data.element_size() for item in self.tensors)

    def run(self) -> None:
        """Write this rank's files, vote, and (rank 0) commit. Raises ``SaveFailedError``."""
        status = self._write_local()
        statuses = self._collective("voting on the save", comm.all_gather_object, status)
        failed = [(r, s) for r, s in enumerate(statuses) if not s.ok]
        if failed:
            self._abandon()
            raise SaveFailedError(
                f"saving {str(self.target)!r} failed on {len(failed)} rank(s); nothing was committed:\n  "
                + "\n  ".join(f"rank {r}: {s.error}" for r, s in failed))
        commit_error = None
        if self.rank == 0:
            try:
                write_metadata(self.tmp, self._metadata(statuses))
                commit_directory(self.tmp, self.target)
            except Exception as e:  # reported to every rank below
                commit_error = f"{type(e).__name__}: {e}"
                self._abandon()
        try:
            commit_error = comm.broadcast_object(commit_error, group=self.group)
        except Exception as e:
            if self.rank == 0 and commit_error is None:  # committed; only the news did not travel
                logger.warning("saved %s, but could not tell the other ranks: %s", self.target, e)
                return
            raise self._lost(e, "waiting for rank 0's commit") from e
        if commit_error is not None:
            raise SaveFailedError(f"committing {str(self.target)!r} failed on rank 0: {commit_error}")
        logger.info("saved checkpoint %s (%d tensors, %d objects)", self.target, len(self.plan.records),
                    len(self.plan.object_paths))

    def _collective(self, phase: str, fn: Callable[..., Any], obj: Any) -> Any:
        try:
            return fn(obj, group=self.group)
        except Exception as e:
            self._abandon()
            raise self._lost(e, phase) from e

    def _lost(self, error: Exception, phase: str) -> SaveFailedError:
        return SaveFailedError(
            f"saving {str(self.target)!r}: rank {self.rank} lost contact with the other ranks while {phase} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}); a rank died or "
            f"stalled past the checkpoint timeout. Nothing was committed; the previous checkpoint is intact.")

    def _abandon(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _write_local(self) -> _Status:
        """Write this rank's main replicas (and rank 0's common state); never raises."""
        status = _Status(ok=True)
        try:
            with self.progress:
                write_shards(self.tmp, self.tensors, on_bytes=self.progress.update)
            for item in self.tensors:
                if item.create:
                    zarr_json = (self.tmp / item.record.path / "zarr.json").read_bytes()
                    status.zarr_json_crc[item.key] = crc32c(zarr_json)
            for rel, data in self.objects.items():
                status.object_crc[rel] = write_file(self.tmp / rel, data)
            if self.common is not None:
                status.common_crc = write_file(self.tmp / COMMON_FILE, self.common)
            fsync_dir(self.tmp)  # the key directories' entries (write_shards fsyncs inside each key directory)
        except Exception as e:  # every rank learns of it through the vote
            logger.exception("rank %d failed while saving into %s", self.rank, self.tmp)
            status = _Status(ok=False, error=f"{type(e).__name__}: {e}")
        return status

    def _metadata(self, statuses: Sequence[_Status]) -> CheckpointMetadata:
        crcs = {path: crc for s in statuses for path, crc in s.object_crc.items()}
        objects: dict[str, ObjectRecord] = {}
        for (key, offset), (rel, global_shape, rank) in sorted(self.plan.object_paths.items()):
            rec = objects.setdefault(key, ObjectRecord(global_shape=global_shape, shards=[]))
            rec.shards.append(ObjectShardRecord(offset=offset, path=rel, rank=rank, weights_only=True,
                                                crc32c=crcs[rel]))
        common_crc = statuses[0].common_crc
        zarr_crcs = {key: crc for s in statuses for key, crc in s.zarr_json_crc.items()}
        # the plan's records may be cached for the next save: copies, not edits
        tensors = {key: rec.model_copy(update={"zarr_json_crc32c": zarr_crcs.get(key)})
                   for key, rec in self.plan.full_records().items()}
        return CheckpointMetadata(
            world_size=len(statuses), parallel_sizes=self.parallel_sizes,
            common=CommonRecord(path=COMMON_FILE, weights_only=True, crc32c=common_crc)
            if common_crc is not None else None,
            tensors=tensors, objects=objects)


def plan_save(sharded_state_dict: ShardedStateDict, target: Path, common_state_dict: dict[str, Any] | None,
              overwrite: bool, parallel_sizes: dict[str, int] | None, timeout_s: float | None,
              snapshot: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SaveJob:
    """Describe, serialise and validate (collective); returns the job of this rank.

    ``snapshot``: applied to every tensor this rank writes (``async_save`` copies them), else the
    tensors are written from where they are.

    Raises (on every rank alike): ``ShardingValidationError``, ``UnsafeCheckpointError``,
    ``CheckpointExistsError``, ``SaveFailedError`` (a rank died during planning).
    """
    me = comm.rank()
    group = comm.checkpoint_group(comm.resolve_timeout(timeout_s))
    built = build_factories(sharded_state_dict)
    leaves = [leaf for _, leaf in sharded_leaves(built)]
    descs, problems = describe_for_save(leaves, me)
    unsafe: list[str] = []
    objects = _serialize_objects(leaves, unsafe)
    common = None
    if me == 0:
        whole = {"common": common_state_dict or {}, "nonsharded": nonsharded_subtrees(sharded_state_dict)}
        common = _serialize_or_note(whole, "common_state_dict (and non-sharded leaves)", unsafe)
    prep: Any = _prepare_target(target, overwrite) if me == 0 else None
    try:
        plan, prep, problems, unsafe = _plan_cache.plan(descs, problems, unsafe, prep, group)
    except Exception as e:
        if isinstance(prep, str):
            shutil.rmtree(prep, ignore_errors=True)
        if isinstance(e, CheckpointingError):
            raise
        raise SaveFailedError(f"saving {str(target)!r}: rank {me} lost contact with the other ranks while planning "
                              f"({type(e).__name__}: {e}); nothing was written") from e
    if isinstance(prep, BaseException):
        raise prep
    tmp = Path(prep)
    if problems or unsafe:
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        cls = UnsafeCheckpointError if unsafe and not problems else ShardingValidationError
        all_problems = problems + unsafe
        raise cls(f"cannot save {str(target)!r}: {len(all_problems)} problem(s) with the sharded state dict; nothing "
                  "was written:\n  " + "\n  ".join(all_problems))
    take = snapshot or (lambda t: t)
    items = []
    for leaf in leaves:
        if isinstance(leaf, ShardedTensor) and leaf.is_main_replica:
            assert leaf.data is not None  # checked in describe_for_save
            data = take(leaf.data).reshape(leaf.full_local_shape)  # add the prepended axes
            items.append(WriteItem(leaf.key, plan.records[leaf.key], tuple(leaf.global_offset), data,
                                   create=not any(leaf.global_offset)))
    object_files = {plan.object_paths[key][0]: data for key, data in objects.items()}
    sizes = parallel_sizes if parallel_sizes is not None else _default_parallel_sizes()
    return SaveJob(target, tmp, me, group, plan, items, object_files, common, sizes)


def _serialize_or_note(obj: Any, what: str, unsafe: list[str]) -> bytes | None:
    try:
        return serialize(obj, what)
    except UnsafeCheckpointError as e:
        unsafe.append(f"rank {comm.rank()}: {e}")
        return None


def _serialize_objects(leaves: Sequence[ShardedTensor | ShardedObject], unsafe: list[str]
                       ) -> dict[tuple[str, tuple[int, ...]], bytes]:
    out = {}
    for leaf in leaves:
        if isinstance(leaf, ShardedObject) and leaf.is_main_replica:
            data = _serialize_or_note(leaf.data, f"ShardedObject {leaf.key!r}", unsafe)
            if data is not None:
                out[(leaf.key, tuple(leaf.global_offset))] = data
    return out


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


def _default_parallel_sizes() -> dict[str, int]:
    from megatron_core import parallel_state

    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size()
        if parallel_state.model_parallel_is_initialized() else comm.world_size(),
    }
