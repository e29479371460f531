"""Memory-mapped indexed dataset: documents of token ids in a ``.bin`` file, found through an ``.idx``.

Layout of ``PREFIX.idx`` (little endian)::

    magic      8 bytes   b"MCIDX\\0\\0\\0"
    version    uint64    1
    dtype      uint8     code of the token dtype (see ``_DTYPE_CODES``)
    num_docs   uint64
    sizes      int32[num_docs]    tokens per document
    pointers   int64[num_docs]    byte offset of each document in PREFIX.bin

``PREFIX.bin`` is the token ids of every document back to back. Reading maps both files, so a
dataset far larger than memory costs nothing until a sample is touched.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

_MAGIC = b"MCIDX\x00\x00\x00"
_VERSION = 1
_DTYPE_CODES: dict[int, type[np.integer]] = {1: np.uint8, 2: np.uint16, 3: np.int32, 4: np.int64}
_HEADER = struct.Struct("<8sQBQ")


class IndexedDatasetError(ValueError):
    """An ``.idx``/``.bin`` pair is missing, truncated, or of an unknown format."""


def best_dtype(vocab_size: int) -> type[np.integer]:
    """The smallest dtype that holds token ids below ``vocab_size``."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _code_of(dtype: type[np.integer]) -> int:
    for code, candidate in _DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise IndexedDatasetError(f"token dtype {np.dtype(dtype)} not supported; use one of "
                              f"{[np.dtype(d).name for d in _DTYPE_CODES.values()]}")


class IndexedDatasetBuilder:
    """Append documents to ``PREFIX.bin``; ``finalize()`` writes ``PREFIX.idx``.

    Example:
        >>> with IndexedDatasetBuilder("data/corpus", dtype=np.uint16) as builder:
        ...     builder.add_document([5, 6, 7])
    """

    def __init__(self, prefix: str | Path, dtype: type[np.integer] = np.uint16) -> None:
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        _code_of(dtype)
        self._bin = open(self.prefix.with_suffix(".bin"), "wb")
        self._sizes: list[int] = []

    def add_document(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        """Append one document (a 1-d sequence of token ids)."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise IndexedDatasetError(f"{self.prefix}: a document must be 1-d token ids, got shape {array.shape}")
        if array.size and (array.min() < 0 or array.max() > np.iinfo(self.dtype).max):
            raise IndexedDatasetError(
                f"{self.prefix}: token ids in [{array.min()}, {array.max()}] do not fit dtype {self.dtype}; "
                "build with a wider dtype (best_dtype(vocab_size))"
            )
        self._bin.write(array.astype(self.dtype).tobytes(order="C"))
        self._sizes.append(int(array.size))

    def finalize(self) -> Path:
        """Close the ``.bin`` and write the ``.idx``; returns the prefix."""
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * self.dtype.itemsize
        with open(self.prefix.with_suffix(".idx"), "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, _code_of(self.dtype.type), len(sizes)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
        return self.prefix

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._bin.close()


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin`` + ``PREFIX.idx``; ``ds[i]`` is document i."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise IndexedDatasetError(f"{path} not found; build it with IndexedDatasetBuilder or "
                                          "`python -m megatron_core.data.preprocess`")
        raw = idx_path.read_bytes()
        if len(raw) < _HEADER.size:
            raise IndexedDatasetError(f"{idx_path}: truncated header ({len(raw)} bytes)")
        magic, version, code, num_docs = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            raise IndexedDatasetError(f"{idx_path}: not an indexed dataset index (magic {magic!r}, expected {_MAGIC!r})")
        if version > _VERSION:
            raise IndexedDatasetError(f"{idx_path}: format version {version} is newer than this reader "
                                      f"({_VERSION}); upgrade megatron_core")
        if code not in _DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(_DTYPE_CODES[code])
        expected = _HEADER.size + num_docs * (4 + 8)
        if len(raw) != expected:
            raise IndexedDatasetError(f"{idx_path}: {len(raw)} bytes, expected {expected} for {num_docs} documents")
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=num_docs, offset=_HEADER.size)
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=num_docs, offset=_HEADER.size + 4 * num_docs)
        total = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_path.stat().st_size != total:
            raise IndexedDatasetError(f"{bin_path}: {bin_path.stat().st_size} bytes, index expects {total}; "
                                      "the pair is from different builds or the .bin is truncated")
        # np.memmap refuses empty files: an empty dataset has nothing to map.
        self._tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if total
                        else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``index`` (a read-only view)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.prefix}: document {index} out of range [0, {len(self)})")
        size = int(self.sizes[index])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: slice [{offset}, {offset + length}) outside document {index} "
                             f"of {size} tokens")
        start = int(self.pointers[index]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)
