"""Megatron-Core's import path for the module base; the code lives in ``megatron_core.module``.

Kept so that ``from megatron_core.transformer.module import MegatronModule`` (the path Megatron-Core
users know) keeps working; library code imports ``megatron_core.module`` directly.
"""

from megatron_core.module import (
    MegatronModule,
    default_sharded_state_dict,
    make_replicated_tensor,
    make_sharded_tensors_for_checkpoint,
    make_tp_sharded_tensor,
    replica_id_for,
)

__all__ = [
    "MegatronModule",
    "default_sharded_state_dict",
    "make_replicated_tensor",
    "make_sharded_tensors_for_checkpoint",
    "make_tp_sharded_tensor",
    "replica_id_for",
]
