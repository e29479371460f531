"""Sharded checkpoints: save at one parallel layout, load at any other.

Format (one directory): ``metadata.json`` (written last: the commit marker), ``common.pt``, one
zarr3 array per tensor key (written through tensorstore, crc32c on every inner chunk) and
``objects/`` for ``ShardedObject``s. See ``serialization.py`` for the save protocol.
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
    load,
    load_common_state_dict,
    load_plain_tensors,
    load_sharded_metadata,
    load_tensors_metadata,
    save,
)
from megatron_core.dist_checkpointing.validation import StrictHandling

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "CheckpointExistsError", "CheckpointFormatError", "CheckpointMetadata",
    "CheckpointMismatchError", "CheckpointNotFoundError", "CheckpointingError", "CorruptedCheckpointError",
    "DTypeMismatchError", "IncompleteCheckpointError", "MissingChunkError", "MissingKeyError", "SaveFailedError",
    "ShapeMismatchError", "ShardedObject", "ShardedStateDict", "ShardedTensor", "ShardedTensorFactory",
    "ShardingError", "ShardingValidationError", "StrictHandling", "UnexpectedKeyError",
    "UnsupportedFormatVersionError", "load", "load_common_state_dict", "load_plain_tensors",
    "load_sharded_metadata", "load_tensors_metadata", "read_metadata", "save",
]
