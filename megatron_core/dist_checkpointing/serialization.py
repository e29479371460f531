"""``save`` and ``async_save`` of sharded state dicts (``load`` and the inspection functions live
in ``loading.py`` and are re-exported here: this module is the public save/load API).

Save protocol (every rank calls ``save`` with its own sharded state dict; ``save_job.py``):

1. Each rank describes its shards and serialises its objects (and rank 0 the common state); rank 0
   checks the target and makes ``<dir>.tmp-<id>`` beside it. One ``all_gather_object`` shares
   both, and every rank validates the union: each key's main replicas must tile its global shape
   exactly once. Any problem: every rank raises, nothing is written. A repeated save of the same
   structure reuses the validated plan (``plan_cache.py``) and gathers only digests.
2. Each main replica writes its chunks and fsyncs every file it wrote, then its key directories
   (``write_shards``); rank 0 writes the common state. Directories are fsync'd. Every ``torch.save``
   file's crc32c is recorded.
3. A second ``all_gather_object`` is the barrier and the success vote: if any rank failed, every
   rank raises and the temporary directory is removed.
4. Rank 0 writes ``metadata.json`` (the commit marker, sealed with its own crc32c) last, then
   renames the directory into place; when overwriting, the old and new directories are swapped
   atomically (``renameat2``), so there is always a complete checkpoint at the target. Every rank
   waits for the commit.

``async_save`` runs steps 2-4 in a background thread after snapshotting (``background.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megatron_core.dist_checkpointing.background import (
    AsyncSaveHandle,
    Snapshot,
    release_snapshot_buffers,
    start,
    wait_for_pending_saves,
)
from megatron_core.dist_checkpointing.loading import (
    load,
    load_common_state_dict,
    load_plain_tensors,
    load_sharded_metadata,
    load_tensors_metadata,
)
from megatron_core.dist_checkpointing.mapping import ShardedStateDict
from megatron_core.dist_checkpointing.progress import Progress
from megatron_core.dist_checkpointing.save_job import SaveJob, plan_save

__all__ = ["AsyncSaveHandle", "async_save", "load", "load_common_state_dict", "load_plain_tensors",
           "load_sharded_metadata", "load_tensors_metadata", "release_snapshot_buffers", "save",
           "wait_for_pending_saves"]


def save(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir: str | os.PathLike[str],
    *,
    common_state_dict: dict[str, Any] | None = None,
    overwrite: bool = False,
    parallel_sizes: dict[str, int] | None = None,
    timeout: float | None = None,
    progress: bool | None = None,
) -> None:
    """Save a (nested) sharded state dict; every rank calls this with its own shards.

    Args:
        sharded_state_dict: nested dicts/lists of ``ShardedTensor``, ``ShardedObject`` and
            ``ShardedTensorFactory``; other leaves are stored once (by rank 0) and handed back by
            ``load`` at the same place.
        checkpoint_dir: the directory to create. It must not exist, be empty, or (with
            ``overwrite``) hold a committed checkpoint.
        common_state_dict: non-sharded state (iteration, config, scheduler), saved once by rank 0;
            read back with ``load_common_state_dict``. Objects, the common state and non-sharded
            leaves must be plain values (tensors, numbers, strings, bytes, lists, tuples, dicts):
            loading never unpickles code.
        overwrite: replace an existing committed checkpoint (atomically).
        parallel_sizes: recorded in the metadata; default: the sizes from ``parallel_state``.
        timeout: seconds a rank waits for the others in the save's collectives before raising
            (default ``$MCORE_CKPT_TIMEOUT_S`` or 600).
        progress: a tqdm bar on rank 0 for saves that take more than ~2 s when stderr is a
            terminal; None: on unless ``$MCORE_CKPT_PROGRESS=0``.

    Raises:
        ShardingValidationError: the shards do not tile their tensors exactly once (all problems).
        UnsafeCheckpointError: an object or the common state is not made of plain values.
        CheckpointExistsError: the target exists and ``overwrite`` is not set.
        SaveFailedError: some rank failed to write, or died; nothing was committed. Also: the
            previous ``async_save`` failed and nobody waited for it.
    """
    wait_for_pending_saves()
    job = start_save(sharded_state_dict, checkpoint_dir, common_state_dict, overwrite, parallel_sizes, timeout,
                     progress)
    job.run()


def async_save(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir: str | os.PathLike[str],
    common_state_dict: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    parallel_sizes: dict[str, int] | None = None,
    timeout: float | None = None,
    progress: bool | None = None,
) -> AsyncSaveHandle:
    """``save`` in the background; returns once this rank holds a private snapshot of its shards.

    Arguments and format as ``save``. The caller may modify the tensors as soon as this returns:
    the checkpoint holds their values at the call. Validation problems raise here, on every rank.
    No progress bar unless ``progress=True`` (the training loop's bar owns the terminal).
    The snapshot's host buffers are kept after the save commits and reused by the next
    ``async_save`` of the same shapes (one snapshot's worth of memory; ``release_snapshot_buffers()``
    frees it).

    Returns:
        A handle: ``wait(timeout=None)`` blocks until committed (raising ``SaveFailedError`` naming
        the rank and cause), ``done()`` polls. The next save (sync or async) and
        ``wait_for_pending_saves()`` wait for it first; at interpreter exit it is waited for.
    """
    wait_for_pending_saves()
    snap = Snapshot()
    job = start_save(sharded_state_dict, checkpoint_dir, common_state_dict, overwrite, parallel_sizes, timeout,
                     progress, snapshot=snap)
    snap.finish()
    return start(job, snap)


def start_save(sharded_state_dict: ShardedStateDict, checkpoint_dir: str | os.PathLike[str],
               common_state_dict: dict[str, Any] | None, overwrite: bool, parallel_sizes: dict[str, int] | None,
               timeout: float | None, progress: bool | None, snapshot: Snapshot | None = None) -> SaveJob:
    target = Path(os.path.abspath(checkpoint_dir))

    def take(t: torch.Tensor) -> torch.Tensor:
        return snapshot(t) if snapshot is not None else t

    job = plan_save(sharded_state_dict, target, common_state_dict, overwrite, parallel_sizes, timeout,
                    take if snapshot is not None else None)
    job.progress = Progress(f"save {target.name}", job.nbytes, enabled=progress)
    return job
