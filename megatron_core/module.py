"""MegatronModule: the base of every module that holds state, and its default checkpoint sharding.

The default ``sharded_state_dict`` walks the children: a child that declares its own sharding
(``ColumnParallelLinear``...) is asked for it; every other parameter or buffer is marked as
replicated across tensor-parallel ranks (one main replica, written once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.config import TransformerConfig
from megatron_core.dist_checkpointing.mapping import RankOffset, ShardedStateDict, ShardedTensor


def replica_id_for(tp_sharded: bool) -> tuple[int, int, int]:
    """Megatron-Core's replica id: (0, tp_rank if replicated over TP else 0, dp_rank)."""
    tp_rank = 0 if tp_sharded else parallel_state.get_tensor_model_parallel_rank()
    return (0, tp_rank, parallel_state.get_data_parallel_rank(with_context_parallel=True))


def make_tp_sharded_tensor(
    tensor: torch.Tensor, key: str, tp_axis: int = 0, sharded_offsets: Iterable[RankOffset] = ()
) -> ShardedTensor:
    """A tensor split across TP ranks along ``tp_axis`` (of the local tensor)."""
    offsets = tuple(sharded_offsets)
    prepend = len(offsets)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return ShardedTensor.from_rank_offsets(
        key, tensor, *offsets, (tp_axis + prepend, tp_rank, tp_size),
        replica_id=replica_id_for(tp_sharded=True), prepend_axis_num=prepend,
    )


def make_replicated_tensor(
    tensor: torch.Tensor, key: str, sharded_offsets: Iterable[RankOffset] = ()
) -> ShardedTensor:
    """A tensor every TP rank holds whole (norm weights, row-parallel bias)."""
    offsets = tuple(sharded_offsets)
    return ShardedTensor.from_rank_offsets(
        key, tensor, *offsets, replica_id=replica_id_for(tp_sharded=False), prepend_axis_num=len(offsets)
    )


def make_sharded_tensors_for_checkpoint(
    state_dict: dict[str, Any],
    prefix: str,
    tensor_parallel_layers_axis_map: dict[str, int] | None = None,
    sharded_offsets: Iterable[RankOffset] = (),
) -> ShardedStateDict:
    """Wrap a plain (local) state dict: names in the axis map are TP-split, the rest replicated.

    Non-tensor entries (``_extra_state``) are skipped deliberately: they hold kernel settings,
    not model state.
    """
    axis_map = tensor_parallel_layers_axis_map or {}
    offsets = tuple(sharded_offsets)
    out: ShardedStateDict = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
            continue
        key = f"{prefix}{name}"
        if name in axis_map:
            out[key] = make_tp_sharded_tensor(tensor, key, axis_map[name], offsets)
        else:
            out[key] = make_replicated_tensor(tensor, key, offsets)
    return out


def default_sharded_state_dict(
    module: torch.nn.Module, prefix: str = "", sharded_offsets: Iterable[RankOffset] = (),
    metadata: dict[str, Any] | None = None,
) -> ShardedStateDict:
    """Own parameters/buffers replicated over TP; children asked for their own sharding."""
    offsets = tuple(sharded_offsets)
    own: dict[str, torch.Tensor] = {name: t for name, t in module._parameters.items() if t is not None}
    own.update({name: t for name, t in module._buffers.items()
                if t is not None and name not in module._non_persistent_buffers_set})
    out = make_sharded_tensors_for_checkpoint(own, prefix, None, offsets)
    for name, child in module.named_children():
        child_prefix = f"{prefix}{name}."
        own_sharding = getattr(child, "sharded_state_dict", None)
        if callable(own_sharding):
            out.update(own_sharding(child_prefix, offsets, metadata))
        else:
            out.update(default_sharded_state_dict(child, child_prefix, offsets, metadata))
    return out


class MegatronModule(torch.nn.Module):
    """Base class: holds the config and implements the default ``sharded_state_dict``.

    Building a module checks that the config's parallel sizes equal those of the groups that will
    split it (``parallel_state.check_config_parallel_sizes``): the process groups decide.

    Args:
        config: the model's config. Modules that need none (position tables, the ``nn`` facade's
            containers) pass ``None`` and then have no ``config`` attribute.
        groups: explicit process groups the module was handed, by argument name
            (``{"tp_group": tp_group}``); missing or ``None`` means parallel_state's.

    Raises:
        ParallelSizeMismatchError: a parallel size of ``config`` disagrees with its group.
    """

    config: TransformerConfig

    def __init__(
        self, config: TransformerConfig | None = None, *, groups: Mapping[str, ProcessGroup | None] | None = None
    ) -> None:
        super().__init__()
        if config is not None:
            parallel_state.check_config_parallel_sizes(config, groups)
            self.config = config

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> ShardedStateDict:
        """Sharded view of ``state_dict()`` with the same keys (``prefix`` prepended)."""
        return default_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def set_is_first_microbatch(self) -> None:
        """Hook for kernels that cache weights per micro-batch (TE fp8); no-op locally."""
