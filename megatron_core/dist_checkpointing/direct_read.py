"""Loading whole stored chunks straight into the destination tensor, crc32c checked in parallel.

A load at the saving layout (and a resharding load that needs whole stored chunks, e.g. TP=2 ->
TP=1) reads every stored chunk whole. Those reads skip tensorstore: a chunk file is its inner
chunks, each ``data + crc32c``, then an index (``(offset, nbytes)`` per inner chunk, ``+ crc32c``).
Each inner chunk whose place in the destination is one contiguous run of bytes is read with one
``preadv`` straight there (no intermediate copy) and its crc32c checked in place; a tile of a
strided region goes through one small (inner-chunk sized, ~1 MiB) buffer per task. All of it runs
on a thread pool (``preadv``, ``crc32c`` and torch copies release the GIL). Partial chunks go
through ``TensorReader``.

The same bytes tensorstore would verify are verified here: a flipped byte anywhere in a chunk file
(data, checksum or index) raises ``CorruptedCheckpointError`` naming the key and the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_core.dist_checkpointing.checksums import crc32c
from megatron_core.dist_checkpointing.errors import CorruptedCheckpointError
from megatron_core.dist_checkpointing.metadata import TensorRecord
from megatron_core.dist_checkpointing.planner import Box, ReadItem
from megatron_core.dist_checkpointing.tensorstore_io import chunk_file, missing_chunk_error

_TASK_BYTES = 16 << 20  # inner chunks per pool task: enough to amortise, small enough to spread a big tensor


def contiguous_span(shape: Sequence[int], box: Box) -> tuple[int, int] | None:
    """(first element, element count) of ``box`` in a C-contiguous array of ``shape``, or None
    when the box is not one contiguous run of elements."""
    partial = [a for a, (lo, hi) in enumerate(box) if hi - lo != shape[a]]
    # contiguous: every axis after the last partial one is whole, every axis before it has extent 1
    if partial and any(hi - lo != 1 for lo, hi in box[:partial[-1]]):
        return None
    start = 0
    for a, (lo, _) in enumerate(box):
        start = start * shape[a] + lo
    return start, math.prod(hi - lo for lo, hi in box)


@dataclass(frozen=True)
class _Tile:
    """One stored piece (an inner chunk, or a whole plain chunk): where it is in the file, where
    it goes in the destination, and, when that place is one contiguous run, its byte range."""

    index: int
    target: Box
    span: tuple[int, int] | None  # byte range in the destination, when contiguous


class DirectReader:
    """Reads eligible ``ReadItem``s (whole stored chunks) straight into the destination."""

    def __init__(self, root: Path, threads: int | None = None, on_bytes: Callable[[int], None] | None = None) -> None:
        self.root = root
        self.on_bytes = on_bytes
        self._pool = ThreadPoolExecutor(threads or min(8, max(2, os.cpu_count() or 2)),
                                        thread_name_prefix="ckpt-read")
        self._futures: list[Future[None]] = []

    def try_read(self, key: str, record: TensorRecord, out: torch.Tensor, item: ReadItem) -> bool:
        """Start reading ``item`` into ``out`` (C-contiguous) if it is one whole stored chunk;
        False leaves it to the caller (``TensorReader``)."""
        chunk = tuple(record.chunk_shape)
        box = item.global_box
        if not out.is_contiguous() or any(lo % c or hi - lo != c for (lo, hi), c in zip(box, chunk, strict=True)):
            return False
        index = tuple(lo // c for (lo, _), c in zip(box, chunk, strict=True))
        path = chunk_file(self.root, record, index)
        inner = tuple(record.inner_chunk_shape)
        plain = inner == chunk  # bytes + crc32c, no index
        grid = tuple(c // i for c, i in zip(chunk, inner, strict=True))
        tile_bytes = math.prod(inner) * out.element_size()
        origin = tuple(lo for lo, _ in item.target_box)
        tiles = []
        for n, cell in enumerate(np.ndindex(*grid)):
            target = tuple((o + g * i, o + (g + 1) * i) for o, g, i in zip(origin, cell, inner, strict=True))
            span = contiguous_span(tuple(out.shape), target)
            tiles.append(_Tile(n, target, None if span is None else (span[0] * out.element_size(), tile_bytes)))
        entries = None if plain else self._read_index(key, record, index, path, len(tiles))
        per_task = max(1, _TASK_BYTES // max(tile_bytes, 1))
        for lo in range(0, len(tiles), per_task):
            self._futures.append(self._pool.submit(self._read_tiles, key, record, index, path, out, tile_bytes,
                                                   inner, entries, tiles[lo:lo + per_task]))
        return True

    def finish(self) -> None:
        """Wait for every read; the first failure raises (the others are waited for, then dropped)."""
        error: BaseException | None = None
        for future in self._futures:
            try:
                future.result()
            except BaseException as e:  # keep waiting: no read may still write into a tensor after this
                error = error or e
        self._futures.clear()
        self._pool.shutdown(wait=True)
        if error is not None:
            raise error

    # ------------------------------------------------------------------ workers
    def _corrupt(self, key: str, path: Path, what: str) -> CorruptedCheckpointError:
        return CorruptedCheckpointError(f"{key}: reading {str(path)!r} failed: {what}. The stored bytes are damaged; "
                                        "use another checkpoint.")

    def _open(self, record: TensorRecord, key: str, index: tuple[int, ...], path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise missing_chunk_error(self.root, key, record, index) from None

    def _read_index(self, key: str, record: TensorRecord, index: tuple[int, ...], path: Path, n: int) -> np.ndarray:
        fd = self._open(record, key, index, path)
        try:
            size = os.fstat(fd).st_size
            length = 16 * n + 4
            raw = os.pread(fd, length, size - length) if size >= length else b""
        finally:
            os.close(fd)
        if len(raw) != length or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise self._corrupt(key, path, "the shard index failed its crc32c (or the file is truncated)")
        return np.frombuffer(raw[:-4], dtype="<u8").reshape(n, 2)

    def _read_tiles(self, key: str, record: TensorRecord, index: tuple[int, ...], path: Path, out: torch.Tensor,
                    tile_bytes: int, inner: tuple[int, ...], entries: np.ndarray | None, tiles: list[_Tile]) -> None:
        dest = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        scratch: torch.Tensor | None = None
        stored = bytearray(4)
        fd = self._open(record, key, index, path)
        try:
            if entries is None and os.fstat(fd).st_size != tile_bytes + 4:
                raise self._corrupt(key, path, f"file size {os.fstat(fd).st_size}, expected {tile_bytes + 4}")
            for tile in tiles:
                offset, nbytes = (0, tile_bytes + 4) if entries is None else (int(entries[tile.index, 0]),
                                                                               int(entries[tile.index, 1]))
                if nbytes != tile_bytes + 4:
                    raise self._corrupt(key, path, f"inner chunk {tile.index} holds {nbytes} bytes, expected "
                                                   f"{tile_bytes + 4}")
                if tile.span is not None:  # straight into place
                    part = dest[tile.span[0]:tile.span[0] + tile_bytes]
                else:  # a tile of a strided region: through one small buffer, then into place
                    if scratch is None:
                        scratch = torch.empty(inner, dtype=out.dtype)
                    part = memoryview(scratch.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
                if os.preadv(fd, [part, stored], offset) != nbytes:
                    raise self._corrupt(key, path, f"inner chunk {tile.index} is truncated")
                if crc32c(part) != int.from_bytes(stored, "little"):
                    raise self._corrupt(key, path, f"inner chunk {tile.index} failed its crc32c")
                if tile.span is None:
                    assert scratch is not None
                    out[tuple(slice(lo, hi) for lo, hi in tile.target)].copy_(scratch)
        finally:
            os.close(fd)
        if self.on_bytes is not None:
            self.on_bytes(len(tiles) * tile_bytes)
