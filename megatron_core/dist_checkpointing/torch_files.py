"""``torch.save`` files of a checkpoint: ``ShardedObject`` shards and the common state.

Each file is written durably and flagged in ``metadata.json`` with whether it loads under
``torch.load(weights_only=True)`` (checked when saving). Flagged files load that way; the others
(e.g. NumPy RNG state) need full unpickling, exactly as ``torch.load`` would: load checkpoints
only from sources you trust.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from megatron_core.dist_checkpointing.errors import CorruptedCheckpointError, MissingChunkError
from megatron_core.dist_checkpointing.mapping import ShardedObject
from megatron_core.dist_checkpointing.metadata import METADATA_FILE, CheckpointMetadata, fsync_dir

MISSING = object()


def write_torch_file(path: Path, obj: Any) -> bool:
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


def read_common(path: Path, metadata: CheckpointMetadata) -> dict[str, Any]:
    if metadata.common is None:
        return {"common": {}, "nonsharded": {}}
    return read_torch_file(path / metadata.common.path, metadata.common.weights_only, "common state")


def read_object(path: Path, metadata: CheckpointMetadata, leaf: ShardedObject) -> Any:
    record = metadata.objects.get(leaf.key)
    shard = next((s for s in record.shards if tuple(s.offset) == tuple(leaf.global_offset)), None) if record else None
    if shard is None:
        return MISSING
    return read_torch_file(path / shard.path, shard.weights_only, leaf.key)
