"""Exceptions raised by ``dist_checkpointing``: one class per way a checkpoint can be wrong.

Every message names the checkpoint path, the key, what was expected and what was found, and
what to do about it. ``CheckpointingError`` is the common base.
"""

from __future__ import annotations

from collections.abc import Sequence


class CheckpointingError(RuntimeError):
    """Base class of every checkpoint save/load error."""


class CheckpointNotFoundError(CheckpointingError, FileNotFoundError):
    """The checkpoint directory does not exist."""


class IncompleteCheckpointError(CheckpointingError):
    """The directory has no ``metadata.json``: a save never finished (or it is not a checkpoint)."""


class CheckpointFormatError(CheckpointingError):
    """``metadata.json`` is not a checkpoint description this reader understands."""


class UnsupportedFormatVersionError(CheckpointFormatError):
    """The checkpoint was written by a newer format version than this reader supports."""


class CheckpointExistsError(CheckpointingError, FileExistsError):
    """Saving would replace an existing directory and ``overwrite`` was not set."""


class ShardingValidationError(CheckpointingError):
    """The shards to save do not tile their global tensors exactly once (gaps, overlaps, ...)."""


class SaveFailedError(CheckpointingError):
    """A rank failed while saving; nothing was committed."""


class MissingChunkError(CheckpointingError):
    """A chunk file that the metadata lists is missing on disk."""


class CorruptedCheckpointError(CheckpointingError):
    """Stored bytes failed their checksum or could not be decoded."""


class CorruptedMetadataError(CorruptedCheckpointError, CheckpointFormatError):
    """``metadata.json`` failed its own checksum or is not readable JSON."""


class UnsafeCheckpointError(CheckpointingError):
    """A file of the checkpoint can only be loaded by unpickling (running code from the file).

    Checkpoints written by this version never need it; older ones may (e.g. NumPy RNG state).
    Load those with ``allow_pickle=True`` only when you trust where they came from.
    """


class CheckpointMismatchError(CheckpointingError):
    """The requested state dict and the checkpoint disagree (keys, shapes or dtypes).

    One instance lists every problem found; the attributes hold them separately.
    """

    def __init__(
        self,
        message: str,
        *,
        missing_keys: Sequence[str] = (),
        unexpected_keys: Sequence[str] = (),
        shape_mismatches: Sequence[str] = (),
        dtype_mismatches: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)
        self.shape_mismatches = list(shape_mismatches)
        self.dtype_mismatches = list(dtype_mismatches)


class MissingKeyError(CheckpointMismatchError, KeyError):
    """Keys requested by the model are not in the checkpoint (and nothing else is wrong)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class UnexpectedKeyError(CheckpointMismatchError):
    """The checkpoint holds keys no rank asked for (and nothing else is wrong)."""


class ShapeMismatchError(CheckpointMismatchError):
    """A key's global shape differs between the model and the checkpoint (and nothing else)."""


class DTypeMismatchError(CheckpointMismatchError):
    """A key's dtype differs between the model and the checkpoint (and nothing else)."""
