"""Megatron's memory-mapped indexed dataset (``MMIDIDX``): token sequences in ``.bin``, found through ``.idx``.

The files are byte-compatible with Megatron-Core's ``megatron.core.datasets.indexed_dataset``, so a
corpus preprocessed by Megatron's tools trains here unchanged, and ours train there. Layout of
``PREFIX.idx`` (little endian)::

    magic             9 bytes   b"MMIDIDX\\0\\0"
    version           uint64    1
    dtype code        uint8     see ``DTYPE_CODES``
    sequence count S  uint64
    document count D  uint64    (documents + 1)
    sequence lengths  int32[S]  tokens per sequence
    sequence pointers int64[S]  byte offset of each sequence in PREFIX.bin
    document indices  int64[D]  first sequence of each document, then S
    (multimodal only) int8[S]   sequence modes

``PREFIX.bin`` is the tokens of every sequence back to back (no header, no padding). A document is
one or more consecutive sequences (Megatron's preprocessing writes one sequence per sentence when
it splits sentences; ours writes one per document). ``ds[i]`` is sequence ``i``; ``ds[a:b]`` the list
of sequences ``a..b-1``; ``ds.document(d)`` the tokens of document ``d``. Reading maps both files,
so a dataset far larger than memory costs nothing until a sample is touched.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
#: Megatron's dtype codes (``.idx`` byte 17).
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
_FIX = "rebuild it with `python -m megatron_core.data.preprocess` or Megatron's preprocess_data.py"


class IndexedDatasetError(ValueError):
    """An ``.idx``/``.bin`` pair is missing, truncated, or of an unknown format."""


def best_dtype(vocab_size: int) -> type[np.integer]:
    """The dtype Megatron's preprocessing picks for ``vocab_size``: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def _code_of(dtype: type[np.generic] | np.dtype) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise IndexedDatasetError(f"token dtype {np.dtype(dtype)} is not one of Megatron's dtype codes; use one of "
                              f"{[np.dtype(d).name for d in DTYPE_CODES.values()]}")


class IndexedDatasetBuilder:
    """Append sequences to ``PREFIX.bin``; ``finalize()`` writes ``PREFIX.idx``.

    Either one call per document, ``add_document(tokens, lengths)`` (``lengths`` splits the tokens
    into sequences; default one sequence), or ``add_item(sequence)`` per sequence followed by
    ``end_document()``, as Megatron's builder.

    Example:
        >>> with IndexedDatasetBuilder("data/corpus", dtype=np.uint16) as builder:
        ...     builder.add_document([5, 6, 7])
    """

    def __init__(self, prefix: str | Path, dtype: type[np.generic] = np.uint16) -> None:
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        _code_of(self.dtype)
        self._bin = open(self.prefix.with_suffix(".bin"), "wb")
        self._lengths: list[int] = []
        self._document_indices: list[int] = [0]

    def _array(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise IndexedDatasetError(f"{self.prefix}: a sequence must be 1-d token ids, got shape {array.shape}")
        if array.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if array.min() < info.min or array.max() > info.max:
                raise IndexedDatasetError(
                    f"{self.prefix}: token ids in [{array.min()}, {array.max()}] do not fit dtype {self.dtype}; "
                    "build with a wider dtype (best_dtype(vocab_size))")
        return array

    def add_item(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        """Append one sequence to the current document (close it with ``end_document``)."""
        array = self._array(tokens)
        self._bin.write(array.astype(self.dtype).tobytes(order="C"))
        self._lengths.append(int(array.size))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form one document."""
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray | torch.Tensor,
                     lengths: Sequence[int] | None = None) -> None:
        """Append one document; ``lengths`` (summing to ``len(tokens)``) cuts it into sequences."""
        array = self._array(tokens)
        lengths = [int(array.size)] if lengths is None else [int(n) for n in lengths]
        if sum(lengths) != array.size or min(lengths, default=0) < 0:
            raise IndexedDatasetError(f"{self.prefix}: sequence lengths {lengths} do not add up to the "
                                      f"document's {array.size} tokens")
        self._bin.write(array.astype(self.dtype).tobytes(order="C"))
        self._lengths.extend(lengths)
        self.end_document()

    def finalize(self) -> Path:
        """Close the ``.bin`` and write the ``.idx``; returns the prefix."""
        self._bin.close()
        if self._document_indices[-1] != len(self._lengths):  # add_item without a closing end_document
            self.end_document()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * self.dtype.itemsize
        documents = np.asarray(self._document_indices, dtype=np.int64)
        with open(self.prefix.with_suffix(".idx"), "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, _code_of(self.dtype), len(lengths), len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))
        return self.prefix

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._bin.close()


def _read_header(idx_path: Path, size: int) -> tuple[int, int, int]:
    if size < _HEADER.size:
        raise IndexedDatasetError(f"{idx_path}: truncated header ({size} bytes, need {_HEADER.size}); {_FIX}")
    with open(idx_path, "rb") as f:
        magic, version, code, num_sequences, num_doc_indices = _HEADER.unpack(f.read(_HEADER.size))
    if magic != _MAGIC:
        hint = (" (this is the old megatron_core header: rebuild the dataset)" if magic.startswith(b"MCIDX")
                else "")
        raise IndexedDatasetError(f"{idx_path}: not a Megatron indexed dataset index (magic {magic!r}, expected "
                                  f"{_MAGIC!r}){hint}; {_FIX}")
    if version != _VERSION:
        raise IndexedDatasetError(f"{idx_path}: index version {version}, this reader knows version {_VERSION}; "
                                  f"{_FIX}")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)}); {_FIX}")
    return code, num_sequences, num_doc_indices


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin`` + ``PREFIX.idx`` (Megatron's MMIDIDX format).

    Args:
        prefix: path without the ``.bin``/``.idx`` suffix.
        multimodal: the index carries Megatron's per-sequence modes (``sequence_modes``).

    Raises:
        IndexedDatasetError: a file is missing, truncated, of another format, or the pair disagrees.
    """

    def __init__(self, prefix: str | Path, multimodal: bool = False) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise IndexedDatasetError(f"{path} not found; build it with `python -m megatron_core.data.preprocess`"
                                          " (or Megatron's preprocess_data.py), or fix data.prefix")
        idx_size = idx_path.stat().st_size
        code, num_seq, num_docs = _read_header(idx_path, idx_size)
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 12 * num_seq + 8 * num_docs
        # A multimodal index read as plain ignores its modes tail, as Megatron's reader does.
        allowed = (expected + num_seq,) if multimodal else (expected, expected + num_seq)
        if idx_size not in allowed:
            raise IndexedDatasetError(f"{idx_path}: {idx_size} bytes, expected {allowed[0]} for {num_seq} sequences "
                                      f"and {num_docs} document indices (truncated or not MMIDIDX v1); {_FIX}")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = _HEADER.size
        self.sizes = index[offset:offset + 4 * num_seq].view(np.int32)
        offset += 4 * num_seq
        self.pointers = index[offset:offset + 8 * num_seq].view(np.int64)
        offset += 8 * num_seq
        self.document_indices = index[offset:offset + 8 * num_docs].view(np.int64)
        offset += 8 * num_docs
        self.sequence_modes = index[offset:offset + num_seq].view(np.int8) if multimodal else None
        self._check_consistent(idx_path, bin_path)
        total = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        # np.memmap refuses empty files: an empty dataset has nothing to map.
        self._tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if total
                        else np.zeros(0, dtype=self.dtype))

    def _check_consistent(self, idx_path: Path, bin_path: Path) -> None:
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(self.sizes) or np.any(np.diff(docs) < 0):
            raise IndexedDatasetError(f"{idx_path}: document indices must rise from 0 to the sequence count "
                                      f"{len(self.sizes)}; the index is corrupt; {_FIX}")
        total = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_path.stat().st_size != total:
            raise IndexedDatasetError(f"{bin_path}: {bin_path.stat().st_size} bytes, index expects {total}; "
                                      f"the pair is from different builds or the .bin is truncated; {_FIX}")

    # ---- sequences (Megatron's IndexedDataset indexing)
    @property
    def sequence_lengths(self) -> np.ndarray:
        """Tokens per sequence, int32[S] (same as ``sizes``)."""
        return self.sizes

    @property
    def sequence_pointers(self) -> np.ndarray:
        """Byte offset of each sequence in ``.bin``, int64[S] (same as ``pointers``)."""
        return self.pointers

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``index`` (a read-only view)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.prefix}: sequence {index} out of range [0, {len(self)})")
        size = int(self.sizes[index])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: slice [{offset}, {offset + length}) outside sequence {index} "
                             f"of {size} tokens")
        start = int(self.pointers[index]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self.get(i) for i in range(*index.indices(len(self)))]
        return self.get(index)

    # ---- documents
    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document(self, index: int) -> np.ndarray:
        """All tokens of document ``index`` (its sequences back to back; a view)."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"{self.prefix}: document {index} out of range [0, {self.num_documents})")
        first, end = int(self.document_indices[index]), int(self.document_indices[index + 1])
        if first == end:
            return self._tokens[:0]
        start = int(self.pointers[first]) // self.dtype.itemsize
        stop = int(self.pointers[end - 1]) // self.dtype.itemsize + int(self.sizes[end - 1])
        return self._tokens[start:stop]
