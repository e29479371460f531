"""Reading and writing tensor slices as zarr3 arrays through tensorstore.

Layout of one stored tensor (``<checkpoint>/<key>/``): a zarr3 array whose regular chunk grid has
the saving shards' shape, so each saving shard is one chunk file (``c.i.j``) written by one rank. Inside a
chunk file, the ``sharding_indexed`` codec cuts the data into inner chunks (about 1 MiB, along the
split axis) each followed by its crc32c, plus an index (also crc32c'd). A read of any box fetches
only the inner chunks it touches and tensorstore verifies each one's checksum, so a flipped byte
fails every read that touches it, partial reads included. Chunks no bigger than one inner chunk
skip the sharding codec and are stored as ``bytes`` + ``crc32c`` directly.

bfloat16: numpy has no bfloat16, but tensorstore stores it natively and exchanges it as
``ml_dtypes.bfloat16`` arrays; torch tensors cross that boundary as an int16 *view* of the same
bytes (no copy, no rounding).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import torch

from megatron_core.dist_checkpointing.errors import CorruptedCheckpointError, MissingChunkError
from megatron_core.dist_checkpointing.metadata import TensorRecord, torch_dtype
from megatron_core.dist_checkpointing.planner import Box, chunks_of_box, to_slices

_PLAIN_CODECS: list[dict[str, Any]] = [
    {"name": "bytes", "configuration": {"endian": "little"}},
    {"name": "crc32c"},
]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a tensor's bytes (a copy only when not CPU-contiguous)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ts.bfloat16.numpy_dtype)
    return t.numpy()


def from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor sharing ``array``'s memory (bfloat16 through an int16 view)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def codecs(record: TensorRecord) -> list[dict[str, Any]]:
    if tuple(record.inner_chunk_shape) == tuple(record.chunk_shape):
        return _PLAIN_CODECS
    return [{
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": list(record.inner_chunk_shape),
            "codecs": _PLAIN_CODECS,
            "index_codecs": _PLAIN_CODECS,
            "index_location": "end",
        },
    }]


def array_spec(root: Path, record: TensorRecord) -> dict[str, Any]:
    """The full tensorstore spec of a stored tensor (everything zarr.json holds)."""
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(root / record.path) + "/"},
        # zarr skips chunks equal to the fill value by default; then an all-zero tensor (a fresh
        # bias) would look exactly like a lost chunk file. Store everything.
        "store_data_equal_to_fill_value": True,
        "metadata": {
            "shape": list(record.global_shape),
            "data_type": record.dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(record.chunk_shape)}},
            # "c.i.j" files in the key's directory: no nested directories per chunk (fewer inodes
            # to create and fsync per key; the save cost is dominated by per-file work)
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            "codecs": codecs(record),
        },
    }


def chunk_file(root: Path, record: TensorRecord, index: Sequence[int]) -> Path:
    """Path of one chunk file (zarr3 default key encoding, separator ".": ``c.i.j``)."""
    return root / record.path / ".".join(["c", *(str(i) for i in index)])


@dataclass
class WriteItem:
    """One shard to write: ``data`` goes at ``offset`` of the array described by ``record``."""

    key: str
    record: TensorRecord
    offset: tuple[int, ...]
    data: torch.Tensor
    create: bool  # this writer also writes the array's zarr.json


def write_shards(root: Path, items: Sequence[WriteItem]) -> None:
    """Write every item concurrently; each file is fsync'd (with its directory) by tensorstore.

    The caller fsyncs ``root`` itself (it gains one directory per key).

    Only the writer of the array's origin chunk creates ``zarr.json``; the other writers open the
    array with ``assume_metadata`` (they read nothing), so no file has two writers.
    """
    context = ts.Context({"file_io_sync": True})
    creators = {item.key for item in items if item.create}
    opened: dict[str, Any] = {}
    for item in items:
        if item.key not in opened:
            spec = array_spec(root, item.record)
            if item.key in creators:
                opened[item.key] = ts.open(spec, create=True, context=context)
            else:
                opened[item.key] = ts.open(spec, open=True, assume_metadata=True, context=context)
    pending = []
    for item in items:
        store = opened[item.key].result()
        array = to_numpy(item.data)
        box = tuple((o, o + s) for o, s in zip(item.offset, array.shape, strict=True))
        # The source stays alive (in ``pending``) and unmodified until the commit completes.
        future = store[to_slices(box)].write(array, can_reference_source_data_indefinitely=True)
        pending.append((future, array))
    for future, _ in pending:
        future.result()


def check_chunk_files(root: Path, key: str, record: TensorRecord, boxes: Sequence[Box]) -> None:
    """Raise ``MissingChunkError`` if a chunk file these boxes need is absent.

    zarr returns the fill value for an absent chunk; a checkpoint never has absent chunks, so an
    absent file means a damaged checkpoint and must not silently load zeros.
    """
    for box in boxes:
        for index in chunks_of_box(box, record.chunk_shape):
            path = chunk_file(root, record, index)
            if not path.is_file():
                raise MissingChunkError(
                    f"{key}: chunk file {str(path)!r} (chunk {tuple(index)} of grid with chunk shape "
                    f"{tuple(record.chunk_shape)}) is missing; the checkpoint is damaged. Restore the file "
                    "or use another checkpoint."
                )


class TensorReader:
    """Reads boxes of stored tensors; arrays are opened once, from metadata.json alone."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._context = ts.Context()
        self._opened: dict[str, Any] = {}

    def submit(self, key: str, record: TensorRecord, box: Box) -> Any:
        """Start reading ``box`` (global coordinates) of ``key``; returns a tensorstore future."""
        if key not in self._opened:
            self._opened[key] = ts.open(array_spec(self.root, record), open=True, assume_metadata=True,
                                        context=self._context)
        return self._opened[key].result()[to_slices(box)].read()

    def result(self, key: str, record: TensorRecord, future: Any) -> torch.Tensor:
        """Wait for a read; checksum or decode failures become ``CorruptedCheckpointError``."""
        try:
            array = future.result()
        except ValueError as e:
            raise CorruptedCheckpointError(
                f"{key}: reading {str(self.root / record.path)!r} failed: {_short(e)}. The stored bytes "
                "are damaged (checksum mismatch or undecodable); use another checkpoint."
            ) from e
        return from_numpy(array, torch_dtype(record.dtype))


def _short(error: Exception) -> str:
    text = str(error)
    return re.sub(r"\s*\[source locations=.*", "", text, flags=re.S)[:500]
