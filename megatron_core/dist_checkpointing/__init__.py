"""Sharded checkpoints: save at one parallel layout, load at any other.

Format (one directory): ``metadata.json`` (written last: the commit marker), ``common.pt``, one
zarr3 array per tensor key (written through tensorstore, crc32c on every inner chunk) and
``objects/`` for ``ShardedObject``s (``torch.save`` files, crc32c in ``metadata.json``, loaded with
``weights_only=True`` only). See ``serialization.py`` for the save protocol; ``async_save`` saves
in the background.
"""

from megatron_core.dist_checkpointing.errors import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointingError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptedCheckpointError,
    DTypeMismatchError,
    IncompleteCheckpointError,
    MissingChunkError,
    MissingKeyError,
    SaveFailedError,
    ShapeMismatchError,
    ShardingValidationError,
    UnexpectedKeyError,
    UnsafeCheckpointError,
    UnsupportedFormatVersionError,
)
from megatron_core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
    ShardingError,
)
from megatron_core.dist_checkpointing.metadata import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointMetadata,
    read_metadata,
)
from megatron_core.dist_checkpointing.serialization import (
    AsyncSaveHandle,
    async_save,
    load,
    load_common_state_dict,
    load_plain_tensors,
    load_sharded_metadata,
    load_tensors_metadata,
    release_snapshot_buffers,
    save,
    wait_for_pending_saves,
)
from megatron_core.dist_checkpointing.validation import StrictHandling

__all__ = [
    "AsyncSaveHandle", "UnsafeCheckpointError", "async_save", "release_snapshot_buffers", "wait_for_pending_saves",
    "FORMAT_NAME", "FORMAT_VERSION", "CheckpointExistsError", "CheckpointFormatError", "CheckpointMetadata",
    "CheckpointMismatchError", "CheckpointNotFoundError", "CheckpointingError", "CorruptedCheckpointError",
    "DTypeMismatchError", "IncompleteCheckpointError", "MissingChunkError", "MissingKeyError", "SaveFailedError",
    "ShapeMismatchError", "ShardedObject", "ShardedStateDict", "ShardedTensor", "ShardedTensorFactory",
    "ShardingError", "ShardingValidationError", "StrictHandling", "UnexpectedKeyError",
    "UnsupportedFormatVersionError", "load", "load_common_state_dict", "load_plain_tensors",
    "load_sharded_metadata", "load_tensors_metadata", "read_metadata", "save",
]
