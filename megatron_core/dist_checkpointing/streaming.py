"""Write a checkpoint one tensor at a time, in one process (conversions of models larger than memory).

``save`` takes every shard at once (each rank's whole state); a converter reading a model file
tensor by tensor instead hands each tensor to :class:`StreamingCheckpointWriter` as soon as it
has it and drops it. The result is an ordinary checkpoint (same layout, metadata and commit
protocol: written into ``<dir>.tmp-*``, ``metadata.json`` last, then renamed into place), so it
loads at any TP/PP like one written by ``save``.

Example:
    >>> with StreamingCheckpointWriter("ckpt/") as writer:
    ...     for key, tensor in converted_tensors():
    ...         writer.add({key: sharded_leaf_for(key, tensor)})
    ...     writer.commit(common_state_dict={"model_description": ...})
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from megatron_core.dist_checkpointing.checksums import crc32c
from megatron_core.dist_checkpointing.dict_utils import build_factories, sharded_leaves
from megatron_core.dist_checkpointing.errors import CheckpointingError, ShardingValidationError
from megatron_core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from megatron_core.dist_checkpointing.metadata import (
    COMMON_FILE,
    CheckpointMetadata,
    CommonRecord,
    TensorRecord,
    fsync_dir,
    write_metadata,
)
from megatron_core.dist_checkpointing.plan_cache import tensor_records
from megatron_core.dist_checkpointing.rename import commit_directory
from megatron_core.dist_checkpointing.save_job import _prepare_target
from megatron_core.dist_checkpointing.tensorstore_io import WriteItem, write_shards
from megatron_core.dist_checkpointing.torch_files import serialize, write_file
from megatron_core.dist_checkpointing.validation import describe_for_save, validate_global

logger = logging.getLogger(__name__)


class StreamingCheckpointWriter:
    """A single-process checkpoint written key by key; nothing is visible until :meth:`commit`.

    Args:
        checkpoint_dir: the directory to create (same rules as ``save``).
        overwrite: replace an existing committed checkpoint.
        parallel_sizes: recorded in the metadata (default: all 1, a whole model).
    """

    def __init__(self, checkpoint_dir: str | os.PathLike[str], *, overwrite: bool = False,
                 parallel_sizes: dict[str, int] | None = None) -> None:
        self.target = Path(os.path.abspath(checkpoint_dir))
        prep = _prepare_target(self.target, overwrite)
        if isinstance(prep, BaseException):
            raise prep
        self.tmp = Path(prep)
        self.parallel_sizes = parallel_sizes or {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                                                 "data_parallel_size": 1}
        self.records: dict[str, TensorRecord] = {}
        self._committed = False

    def add(self, sharded_state_dict: ShardedStateDict) -> None:
        """Write the whole tensors (``ShardedTensor``s or factories) of ``sharded_state_dict`` now."""
        leaves = [leaf for _, leaf in sharded_leaves(build_factories(sharded_state_dict))]
        if not all(isinstance(leaf, ShardedTensor) for leaf in leaves):
            raise CheckpointingError("StreamingCheckpointWriter.add takes tensors only (no ShardedObject)")
        descs, problems = describe_for_save(leaves, 0)
        problems += validate_global(descs)
        problems += [f"{d.key}: written twice" for d in descs if d.key in self.records]
        if problems:
            raise ShardingValidationError(f"cannot write into {str(self.target)!r}: " + "; ".join(problems))
        records = tensor_records(descs)
        items = []
        for leaf in leaves:
            assert isinstance(leaf, ShardedTensor) and leaf.data is not None
            items.append(WriteItem(leaf.key, records[leaf.key], leaf.global_offset,
                                   leaf.data.reshape(leaf.full_local_shape), create=not any(leaf.global_offset)))
        write_shards(self.tmp, items)
        for key, record in records.items():
            zarr_json = (self.tmp / record.path / "zarr.json").read_bytes()
            self.records[key] = record.model_copy(update={"zarr_json_crc32c": crc32c(zarr_json)})

    def commit(self, common_state_dict: dict[str, Any] | None = None) -> Path:
        """Write the common state and ``metadata.json``, then move the checkpoint into place."""
        data = serialize({"common": common_state_dict or {}, "nonsharded": {}}, "common_state_dict")
        common_crc = write_file(self.tmp / COMMON_FILE, data)
        fsync_dir(self.tmp)
        metadata = CheckpointMetadata(
            world_size=1, parallel_sizes=self.parallel_sizes,
            common=CommonRecord(path=COMMON_FILE, weights_only=True, crc32c=common_crc),
            tensors=dict(sorted(self.records.items())), objects={})
        write_metadata(self.tmp, metadata)
        commit_directory(self.tmp, self.target)
        self._committed = True
        logger.info("wrote checkpoint %s (%d tensors, streamed)", self.target, len(self.records))
        return self.target

    def __enter__(self) -> StreamingCheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
