"""``torch.save`` files of a checkpoint: ``ShardedObject`` shards and the common state.

Loading never runs code from a checkpoint: every file is read with
``torch.load(weights_only=True)`` (tensors, numbers, strings, bytes, lists, tuples, dicts), after
its crc32c (recorded in ``metadata.json``) is checked. Saving refuses objects that would need
unpickling to load. Checkpoints written by older versions may hold such files (e.g. NumPy RNG
state); they load only with an explicit ``allow_pickle=True``, which means trusting their source.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from megatron_core.dist_checkpointing.checksums import crc32c
from megatron_core.dist_checkpointing.errors import (
    CorruptedCheckpointError,
    MissingChunkError,
    UnsafeCheckpointError,
)
from megatron_core.dist_checkpointing.mapping import ShardedObject
from megatron_core.dist_checkpointing.metadata import METADATA_FILE, CheckpointMetadata, fsync_dir

logger = logging.getLogger(__name__)
MISSING = object()
_PLAIN_TYPES = "tensors, numbers, strings, bytes, None, and lists/tuples/dicts of them"


def serialize(obj: Any, what: str) -> bytes:
    """``torch.save`` bytes of ``obj`` (a snapshot of its values).

    Raises:
        UnsafeCheckpointError: ``obj`` would need unpickling to load (``weights_only`` refuses it).
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{what}: cannot be stored as plain values, loading it would need unpickling "
            f"({_first_line(e)}). Checkpoints hold only {_PLAIN_TYPES}: convert the rest (e.g. a NumPy "
            "array with torch.from_numpy, a dataclass with dataclasses.asdict)."
        ) from None
    return data


def write_file(path: Path, data: bytes) -> int:
    """Write ``data`` durably (file and new directories fsync'd); returns its crc32c."""
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
    return crc32c(data)


def read_torch_file(file: Path, what: str, expected_crc: int | None, allow_pickle: bool = False) -> Any:
    """Load one file after checking its crc32c (when recorded), with ``weights_only=True``.

    Raises:
        MissingChunkError: the file is absent.
        CorruptedCheckpointError: checksum mismatch, or undecodable bytes.
        UnsafeCheckpointError: the file needs unpickling and ``allow_pickle`` is not set.
    """
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise MissingChunkError(f"{what}: file {str(file)!r} listed in {METADATA_FILE} is missing; the checkpoint "
                                "is damaged") from None
    except OSError as e:
        raise CorruptedCheckpointError(f"{what}: cannot read {str(file)!r}: {e}") from e
    if expected_crc is not None and crc32c(data) != expected_crc:
        raise CorruptedCheckpointError(
            f"{what}: {str(file)!r} failed its checksum (crc32c {crc32c(data):08x}, {METADATA_FILE} records "
            f"{expected_crc:08x}): the stored bytes are damaged; use another checkpoint.")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{what}: {str(file)!r} can only be loaded by unpickling, which runs code stored in the file "
                f"({_first_line(e)}). Checkpoints written by this version never need it. If the checkpoint was "
                "written by an older version and you trust its source, load with allow_pickle=True."
            ) from None
        logger.warning("%s: loading %s by full unpickling (allow_pickle=True)", what, file)
    except Exception as e:
        raise CorruptedCheckpointError(f"{what}: cannot decode {str(file)!r}: {type(e).__name__}: "
                                       f"{_first_line(e)}") from e
    try:
        return torch.load(io.BytesIO(data), weights_only=False)
    except Exception as e:
        raise CorruptedCheckpointError(f"{what}: cannot decode {str(file)!r}: {type(e).__name__}: "
                                       f"{_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
    text = str(error).replace("\x1b[1m", "").replace("\x1b[0m", "")
    unsupported = [line.strip() for line in text.splitlines() if "Unsupported global" in line]
    if unsupported:  # torch's advice (allow-listing the global) is not ours to give
        line = unsupported[0]
        return line[line.index("Unsupported global"):].split(" was not an allowed global")[0]
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def read_common(path: Path, metadata: CheckpointMetadata, allow_pickle: bool = False) -> dict[str, Any]:
    if metadata.common is None:
        return {"common": {}, "nonsharded": {}}
    return read_torch_file(path / metadata.common.path, "common state", metadata.common.crc32c, allow_pickle)


def read_object(path: Path, metadata: CheckpointMetadata, leaf: ShardedObject, allow_pickle: bool = False) -> Any:
    record = metadata.objects.get(leaf.key)
    shard = next((s for s in record.shards if tuple(s.offset) == tuple(leaf.global_offset)), None) if record else None
    if shard is None:
        return MISSING
    return read_torch_file(path / shard.path, leaf.key, shard.crc32c, allow_pickle)
