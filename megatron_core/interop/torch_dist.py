"""Read a PyTorch Distributed Checkpoint (Megatron-Core's ``torch_dist`` format) on CPU, safely.

A ``torch_dist`` checkpoint directory holds ``.metadata`` (a pickle of
``torch.distributed.checkpoint.metadata.Metadata``: every key's global size, dtype and chunks,
and where each chunk's bytes are), ``__<rank>_<n>.distcp`` data files, and Megatron-Core's
``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``). Every stored item sits at
``(relative_path, offset, length)`` in a data file: a ``torch.save`` archive of one tensor chunk,
or raw bytes for byte objects (Megatron-Core's ``ShardedObject``s and common state, themselves
``torch.save`` archives).

Nothing here runs code from the checkpoint: ``.metadata`` is read by an unpickler that admits only
the checkpoint-description classes it needs, and every item by ``torch.load(weights_only=True)``.
One global tensor is assembled at a time, so memory holds about one tensor.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_core.interop.registry import HFInteropError


class TorchDistError(HFInteropError):
    """A ``torch_dist`` checkpoint is missing, malformed, or holds something we will not read."""


_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
#: (module, name) the ``.metadata`` pickle may name; anything else is refused.
_ALLOWED: dict[tuple[str, str], Any] = {}


def _allowed() -> dict[tuple[str, str], Any]:
    if not _ALLOWED:
        from torch.distributed.checkpoint import filesystem, metadata, planner

        for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                     "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
            _ALLOWED[(_METADATA_MODULE, name)] = getattr(metadata, name)
        _ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
        for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"):
            _ALLOWED[("torch.distributed.checkpoint.planner", name)] = getattr(planner, name)
        _ALLOWED[("torch", "Size")] = torch.Size
        _ALLOWED[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
        _ALLOWED[("collections", "OrderedDict")] = __import__("collections").OrderedDict
        # StorageMeta.checkpoint_id of a plain torch.distributed.checkpoint.save (a path; building one runs no code)
        for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            _ALLOWED[("pathlib", name)] = getattr(pathlib, name)
    return _ALLOWED


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed()
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise TorchDistError(
            f"{self._path}: the checkpoint metadata names {module}.{name}, which is not a checkpoint-description "
            "class; refusing to unpickle it (it could run code). Fix: re-save the checkpoint with a standard "
            "Megatron-Core/PyTorch, or report the class if it is legitimate."
        )


class TorchDistCheckpoint:
    """A ``torch_dist`` checkpoint opened for reading (metadata parsed, no data read yet).

    Args:
        path: the checkpoint directory (the one holding ``.metadata``).

    Raises:
        TorchDistError: not a directory, no ``.metadata``, or metadata we refuse to read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / ".metadata"
        if not self.path.is_dir():
            raise TorchDistError(f"{self.path}: not a directory; pass the Megatron-Core checkpoint directory "
                                 "(the one holding .metadata and *.distcp files)")
        if not meta_file.is_file():
            raise TorchDistError(f"{self.path}: no .metadata file, so not a torch_dist checkpoint (or an unfinished "
                                 "save); pass an iteration directory such as iter_0000100/")
        backend = self.path / "metadata.json"
        if backend.is_file():
            info = json.loads(backend.read_text())
            if info.get("sharded_backend", "torch_dist") != "torch_dist":
                raise TorchDistError(f"{backend}: sharded_backend={info.get('sharded_backend')!r}; only torch_dist "
                                     "checkpoints are read. Fix: re-save with Megatron-Core's default backend")
        with open(meta_file, "rb") as f:
            try:
                self.metadata = _RestrictedUnpickler(f, meta_file).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as err:
                raise TorchDistError(f"{meta_file}: cannot read the checkpoint metadata ({err}); the file is "
                                     "truncated or not a PyTorch distributed checkpoint") from err
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        self.tensor_keys = [k for k, v in self.metadata.state_dict_metadata.items()
                            if isinstance(v, TensorStorageMetadata)]
        self.byte_keys = [k for k, v in self.metadata.state_dict_metadata.items()
                          if isinstance(v, BytesStorageMetadata)]
        self._items: dict[str, list[tuple[Any, Any]]] = {}
        for index, info in self.metadata.storage_data.items():
            self._items.setdefault(index.fqn, []).append((index, info))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[key].size)

    def _read_item(self, key: str, info: Any) -> bytes:
        if getattr(info, "transform_descriptors", None):
            raise TorchDistError(f"{self.path}: {key} is stored with transforms {info.transform_descriptors} "
                                 "(compression); save the checkpoint without them")
        file = self.path / info.relative_path
        if not file.is_file():
            raise TorchDistError(f"{file}: data file missing (needed for {key}); copy the whole checkpoint directory")
        with open(file, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length:
            raise TorchDistError(f"{file}: truncated ({key} needs bytes {info.offset}..{info.offset + info.length})")
        return data

    def tensor(self, key: str, box: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The global tensor ``key`` (or only its ``box``), assembled from the stored chunks it overlaps.

        Chunks outside ``box`` are not read, so a layer of a layer-stacked key costs about one layer
        (Megatron-Core stores each layer as its own chunk).
        """
        meta = self.metadata.state_dict_metadata[key]
        size = tuple(meta.size)
        box = tuple(box or ()) + tuple(slice(0, n) for n in size[len(box or ()):])
        lo = [b.start or 0 for b in box]
        hi = [n if b.stop is None else b.stop for b, n in zip(box, size, strict=True)]
        out = torch.empty([h - low for low, h in zip(lo, hi, strict=True)], dtype=meta.properties.dtype)
        sizes = {tuple(c.offsets): tuple(c.sizes) for c in meta.chunks}
        covered = 0
        for index, info in self._items.get(key, []):
            offset = tuple(index.offset)
            extent = sizes.get(offset)
            if extent is not None and any(o >= h or o + e <= low for o, e, low, h in zip(offset, extent, lo, hi,
                                                                                          strict=True)):
                continue  # no overlap with the box: not read
            chunk = torch.load(io.BytesIO(self._read_item(key, info)), weights_only=True, map_location="cpu")
            cut = [(max(o, low), min(o + n, h)) for o, n, low, h in zip(offset, chunk.shape, lo, hi, strict=True)]
            if any(a >= b for a, b in cut):
                continue
            part = chunk[tuple(slice(a - o, b - o) for (a, b), o in zip(cut, offset, strict=True))]
            if part.shape == out.shape:
                return part  # one chunk covers the box: no second copy
            out[tuple(slice(a - low, b - low) for (a, b), low in zip(cut, lo, strict=True))].copy_(part)
            covered += part.numel()
        if covered != out.numel():
            raise TorchDistError(f"{self.path}: {key} has chunks covering {covered} of {out.numel()} elements"
                                 f"{' of the box ' + str(box) if box else ''}; the checkpoint is incomplete")
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor key with its global tensor, one at a time."""
        for key in self.tensor_keys:
            yield key, self.tensor(key)

    def object(self, key: str, safe_globals: tuple[Any, ...] = (), stub_modules: tuple[str, ...] = ()) -> Any:
        """A byte object (a ``torch.save`` archive) loaded with ``weights_only=True``; see :func:`load_archive`."""
        items = self._items.get(key, [])
        if len(items) != 1:
            raise TorchDistError(f"{self.path}: byte object {key} has {len(items)} stored items, expected 1")
        return load_archive(self._read_item(key, items[0][1]), safe_globals, stub_modules)


class OpaqueObject:
    """Stands in for an object of a class we do not import (e.g. a Megatron-Core enum in Megatron-LM's ``args``).

    Unpickling one records what the pickle passed (an enum's value, an object's state) and runs nothing.

    Attributes:
        args: the constructor arguments the pickle gave (an enum member: its value).
    """

    def __init__(self, *args: Any) -> None:
        self.args = args

    @property
    def value(self) -> Any:
        return self.args[0] if len(self.args) == 1 else self.args

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self.args!r}>"


def pickle_globals(data: bytes) -> set[str]:
    """``module.Name`` of every global the pickle inside a ``torch.save`` archive names (read, never run)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if name is None:
            return set()
        program = archive.read(name)
    found: set[str] = set()
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(program):
        if op.name == "GLOBAL":
            found.add(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def load_archive(data: bytes, safe_globals: tuple[Any, ...] = (), stub_modules: tuple[str, ...] = ()) -> Any:
    """``torch.load(weights_only=True)`` of an archive's bytes, admitting ``safe_globals`` too.

    Classes under ``stub_modules`` (e.g. ``"megatron."``, which we never import) are read as
    :class:`OpaqueObject` stand-ins, so the rest of the object (Megatron-LM's ``args``) still loads.
    """
    allowed: list[Any] = list(safe_globals)
    for name in sorted(pickle_globals(data)) if stub_modules else []:
        if name.startswith(stub_modules):
            module, _, qualname = name.rpartition(".")
            allowed.append((type(qualname, (OpaqueObject,), {"__module__": module}), name))
    with torch.serialization.safe_globals(allowed):
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
