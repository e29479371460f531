"""``metadata.json``: the checkpoint's table of contents, a pydantic model (no pickle).

The file is written last, by rank 0, so its presence marks a complete checkpoint. It records the
format name and integer version (a reader refuses a newer version), the parallel sizes of the
saving run, and for every key: global shape, dtype, chunk grid and the shards that were written.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from megatron_core.dist_checkpointing.checksums import seal_json, unseal_json
from megatron_core.dist_checkpointing.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptedMetadataError,
    IncompleteCheckpointError,
    UnsupportedFormatVersionError,
)
from megatron_core.dist_checkpointing.gc_pause import gc_paused

logger = logging.getLogger(__name__)

FORMAT_NAME: Literal["megatron_core.dist_checkpointing/zarr3"] = "megatron_core.dist_checkpointing/zarr3"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
COMMON_FILE = "common.pt"
OBJECTS_DIR = "objects"
_RESERVED = {METADATA_FILE, COMMON_FILE, OBJECTS_DIR, ".", ".."}
_MAX_NAME = 200

# torch dtype <-> zarr3 data_type name (the name stored in metadata.json and zarr.json).
_TORCH_TO_ZARR: dict[torch.dtype, str] = {
    torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
    torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
    torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}
_ZARR_TO_TORCH = {v: k for k, v in _TORCH_TO_ZARR.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The stored name of a torch dtype.

    Raises:
        CheckpointFormatError: the dtype cannot be stored (complex, fp8, ...).
    """
    try:
        return _TORCH_TO_ZARR[dtype]
    except KeyError:
        raise CheckpointFormatError(
            f"dtype {dtype} cannot be stored; supported: {sorted(_TORCH_TO_ZARR.values())}. "
            "Cast the tensor (or store it through a ShardedTensorFactory)."
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a stored dtype name."""
    try:
        return _ZARR_TO_TORCH[name]
    except KeyError:
        raise CheckpointFormatError(f"unknown stored dtype {name!r}; known: {sorted(_ZARR_TO_TORCH)}") from None


def storage_name(key: str) -> str:
    """A file-system-safe, collision-free directory/file name for a checkpoint key.

    Characters outside ``[A-Za-z0-9._-]`` are %-escaped (so ``/`` never nests), reserved names are
    escaped too, and over-long names are shortened with a hash suffix.
    """
    name = quote(key, safe="._-")
    if name in _RESERVED or name.startswith("."):
        name = f"%{ord(name[0]):02X}{name[1:]}"
    if len(name) > _MAX_NAME:
        import hashlib

        name = f"{name[:_MAX_NAME - 17]}~{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    return name


class _Model(BaseModel):
    # Unknown fields are ignored so that a same-version writer may add optional information.
    model_config = ConfigDict(extra="ignore", frozen=False)


class ShardRecord(_Model):
    """One written shard of a tensor: its box in the global tensor and the rank that wrote it."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    rank: int


class TensorRecord(_Model):
    """Everything needed to read one stored tensor, without opening its zarr.json."""

    path: str
    global_shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]
    inner_chunk_shape: tuple[int, ...]
    shards: list[ShardRecord]
    # crc32c of the array's zarr.json (checked by ``verify``; ``load`` never reads zarr.json)
    zarr_json_crc32c: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.global_shape) * torch.empty((), dtype=torch_dtype(self.dtype)).element_size()


class ObjectShardRecord(_Model):
    """One stored ``ShardedObject`` (a ``torch.save`` file)."""

    offset: tuple[int, ...]
    path: str
    rank: int
    # Always True when written by this version (older ones recorded False for files that need
    # unpickling). Never trusted on load: every file is loaded with weights_only=True unless the
    # caller opts in with allow_pickle=True.
    weights_only: bool
    crc32c: int | None = None  # of the whole file; None: written by an older version


class ObjectRecord(_Model):
    global_shape: tuple[int, ...]
    shards: list[ObjectShardRecord]


class CommonRecord(_Model):
    path: str
    weights_only: bool  # see ObjectShardRecord
    crc32c: int | None = None


class CheckpointMetadata(_Model):
    """The content of ``metadata.json``."""

    format: Literal["megatron_core.dist_checkpointing/zarr3"] = FORMAT_NAME
    version: int = FORMAT_VERSION
    world_size: int
    parallel_sizes: dict[str, int]
    common: CommonRecord | None = None
    tensors: dict[str, TensorRecord]
    objects: dict[str, ObjectRecord]


def write_metadata(checkpoint_dir: Path, metadata: CheckpointMetadata) -> None:
    """Write ``metadata.json`` durably (temp file, fsync, rename, fsync of the directory), sealed
    with the crc32c of its body (``checksums.seal_json``)."""
    final = checkpoint_dir / METADATA_FILE
    tmp = checkpoint_dir / f".{METADATA_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(seal_json(metadata.model_dump_json(indent=1)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(checkpoint_dir)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _leftover_note(checkpoint_dir: Path) -> str:
    parent = checkpoint_dir.parent
    if not parent.is_dir():
        return ""
    leftovers = sorted(p.name for p in parent.glob(f"{checkpoint_dir.name}.tmp-*"))
    if not leftovers:
        return ""
    return (f" Found {len(leftovers)} unfinished save(s) beside it ({', '.join(leftovers[:3])}): a save "
            "was interrupted before it committed; those directories are not checkpoints and can be deleted.")


def metadata_is_sealed(checkpoint_dir: str | os.PathLike[str]) -> bool:
    """Whether ``metadata.json`` carries its own crc32c (written by this version or later)."""
    text = (Path(checkpoint_dir) / METADATA_FILE).read_text(encoding="utf-8")
    return unseal_json(text)[1] is not None


def _read_checked_json(meta_path: Path) -> object:
    """Parse ``metadata.json`` after checking its crc32c (when it has one)."""
    damaged = (f"{str(meta_path)!r} is damaged: {{}}. The checkpoint's table of contents cannot be "
               "trusted; use another checkpoint.")
    try:
        text = meta_path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise CorruptedMetadataError(damaged.format(f"not readable as UTF-8 text ({e})")) from e
    body, stored, computed = unseal_json(text)
    if stored is not None and stored != computed:
        raise CorruptedMetadataError(damaged.format(
            f"crc32c mismatch (stored {stored:08x}, computed {computed or 0:08x})" if stored >= 0
            else "its checksum line is unreadable"))
    try:
        raw = json.loads(body)
    except ValueError as e:
        raise CorruptedMetadataError(damaged.format(f"not valid JSON ({e})")) from e
    if stored is None and _has_file_checksums(raw) and isinstance(raw, dict) and raw.get("format") == FORMAT_NAME \
            and raw.get("version") == FORMAT_VERSION:
        # this version always seals metadata.json: a missing seal is a damaged first line
        raise CorruptedMetadataError(damaged.format("its crc32c line is missing or damaged"))
    return raw


def _has_file_checksums(raw: object) -> bool:
    if not isinstance(raw, dict):
        return False
    common = raw.get("common")
    if isinstance(common, dict) and "crc32c" in common:
        return True
    objects = raw.get("objects")
    return isinstance(objects, dict) and any(
        isinstance(o, dict) and any(isinstance(s, dict) and "crc32c" in s for s in o.get("shards", []))
        for o in objects.values())


#: Where ``commit_directory``'s fallback (no ``renameat2``) parks the old checkpoint while the new one moves in.
ASIDE_MARK = ".old-"


def restore_interrupted_commit(checkpoint_dir: Path) -> bool:
    """Undo a commit interrupted between its two renames (the fallback without ``renameat2``).

    There the old checkpoint was renamed to ``<name>.old-*`` and the process died before the new
    one took its place, so ``checkpoint_dir`` is missing while a complete checkpoint sits beside
    it. Renaming it back restores the last committed state (the interrupted save never returned).
    Returns True when a checkpoint was restored; raises ``CheckpointNotFoundError`` with the fix
    when the rename is not possible (e.g. a read-only file system).
    """
    parent = checkpoint_dir.parent
    if checkpoint_dir.exists() or not parent.is_dir():
        return False
    aside = sorted(p for p in parent.glob(f"{checkpoint_dir.name}{ASIDE_MARK}*") if (p / METADATA_FILE).is_file())
    if not aside:
        return False
    try:
        os.rename(aside[-1], checkpoint_dir)
        fsync_dir(parent)
    except FileExistsError:
        return True  # another rank restored it first
    except OSError as e:
        if checkpoint_dir.is_dir():
            return True  # another rank restored it first
        raise CheckpointNotFoundError(
            f"checkpoint directory {str(checkpoint_dir)!r} does not exist: a save over it was interrupted while "
            f"the committed checkpoint was parked at {str(aside[-1])!r}, and renaming it back failed ({e}). "
            f"Rename {str(aside[-1])!r} to {str(checkpoint_dir)!r} to restore it."
        ) from e
    logger.warning("%s: a save over it was interrupted mid-commit; restored the committed checkpoint from %s",
                   checkpoint_dir, aside[-1].name)
    return True


def read_metadata(checkpoint_dir: str | os.PathLike[str]) -> CheckpointMetadata:
    """Read and check ``metadata.json`` of a checkpoint.

    Raises:
        CheckpointNotFoundError: the directory does not exist.
        IncompleteCheckpointError: there is no ``metadata.json`` (the save did not finish).
        UnsupportedFormatVersionError: written by a newer format version.
        CheckpointFormatError: the file is not this format's metadata.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir() and not restore_interrupted_commit(path):
        raise CheckpointNotFoundError(
            f"checkpoint directory {str(path)!r} does not exist.{_leftover_note(path)} "
            "Check the path (and that the save finished)."
        )
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise IncompleteCheckpointError(
            f"{str(path)!r} has no {METADATA_FILE}: it is an incomplete checkpoint (a save that was "
            "interrupted before it committed) or not a checkpoint at all. It cannot be loaded; "
            "use an earlier checkpoint."
        )
    with gc_paused():  # a large checkpoint's table of contents: hundreds of thousands of small objects
        return _parse(meta_path, path)


def _parse(meta_path: Path, path: Path) -> CheckpointMetadata:
    raw = _read_checked_json(meta_path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointFormatError(
            f"{str(meta_path)!r}: format {found!r} is not {FORMAT_NAME!r}; this is not a "
            "megatron_core.dist_checkpointing checkpoint"
        )
    version = raw.get("version")
    if not isinstance(version, int):
        raise CheckpointFormatError(f"{str(meta_path)!r}: version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{str(path)!r} was written with checkpoint format version {version}, but this reader "
            f"supports versions up to {FORMAT_VERSION}. Upgrade megatron_core to load it."
        )
    try:
        return CheckpointMetadata.model_validate(raw)
    except ValidationError as e:
        raise CheckpointFormatError(f"{str(meta_path)!r} does not describe a checkpoint: {e}") from e
