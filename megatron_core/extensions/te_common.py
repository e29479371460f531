"""What every Transformer Engine wrapper shares: the import guard, checkpoint behaviour, TP-invariant init.

Importing this module raises ``TEUnavailableError`` (an ``ImportError``) unless TE is usable; the
wrapper modules import it first, so they inherit the guard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_core.extensions.te_usability import require_te

require_te("megatron_core.extensions.transformer_engine")

import transformer_engine as te  # noqa: E402
import transformer_engine.pytorch  # noqa: E402,F401  (binds te.pytorch)
from torch.distributed import ProcessGroup  # noqa: E402

from megatron_core import parallel_state  # noqa: E402
from megatron_core.config import TransformerConfig  # noqa: E402
from megatron_core.dist_checkpointing.mapping import RankOffset, ShardedObject, ShardedStateDict  # noqa: E402
from megatron_core.module import make_sharded_tensors_for_checkpoint, replica_id_for  # noqa: E402
from megatron_core.tensor_parallel.layers import _initialize_affine_weight  # noqa: E402

__all__ = ["TEModuleMixin", "extra_state_object", "resolve_tp", "te", "tp_invariant_init"]

EXTRA_STATE = "_extra_state"


class TEModuleMixin:
    """Checkpoint behaviour of every TE wrapper (listed first in the bases, before the TE class).

    * ``sharded_state_dict``: parameters split along ``_tp_axis_map`` (name -> TP axis), the rest
      replicated, exactly like the local twin. TE's ``_extra_state`` (FP8 scaling state) is
      checkpointed only when the module's ``config.fp8`` is set, as a ``ShardedObject`` (see
      :func:`extra_state_object`); without FP8 the checkpoint is the local spec's.
    * loading accepts a state dict without ``_extra_state`` (a local spec's, or one loaded from our
      checkpoints): the missing entry reads as the empty state TE itself saves outside FP8.
    """

    _tp_axis_map: dict[str, int] = {}

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[RankOffset, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> ShardedStateDict:
        """Sharded view of ``state_dict()`` (same dict keys, ``prefix`` prepended), ``_extra_state`` skipped."""
        state = self.state_dict(prefix="", keep_vars=True)  # type: ignore[attr-defined]
        out = make_sharded_tensors_for_checkpoint(state, prefix, self._tp_axis_map, sharded_offsets)
        config = getattr(self, "config", None)
        if config is not None and config.fp8 is not None and EXTRA_STATE in state:
            key = f"{prefix}{EXTRA_STATE}"
            out[key] = extra_state_object(state[EXTRA_STATE], key, sharded_offsets)
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # torch hands each module a mutable dict that its children are filtered from afterwards,
        # so filling the gaps here covers nested TE modules (e.g. an activation op) too.
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if type(module).set_extra_state is not torch.nn.Module.set_extra_state:
                key = f"{prefix}{name + '.' if name else ''}{EXTRA_STATE}"
                state_dict.setdefault(key, torch.empty(0, dtype=torch.uint8))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def set_is_first_microbatch(self) -> None:
        """``MegatronModule``'s hook; a no-op here (no FP8 weight caching across micro-batches)."""


def extra_state_object(state: Any, key: str, sharded_offsets: tuple[RankOffset, ...] = ()) -> ShardedObject:
    """A TE module's ``_extra_state`` as a checkpoint object, laid out like Megatron-Core's.

    One object per layer: the prepended layer axes of ``sharded_offsets`` (axis, index, count) give
    its position in a grid of all layers, so pipeline stages write disjoint objects. TP and DP
    ranks hold the same scaling state (the amax is reduced over them), so only TP rank 0 of DP
    rank 0 writes it and every rank reads it back.
    """
    offsets = sorted(sharded_offsets)
    if [axis for axis, _, _ in offsets] != list(range(len(offsets))):
        raise ValueError(f"{key}: sharded_offsets {offsets} must name the prepended axes 0..n-1 exactly once")
    shape = tuple(count for _, _, count in offsets) or (1,)
    position = tuple(index for _, index, _ in offsets) or (0,)
    return ShardedObject(key, state, shape, position, replica_id=replica_id_for(tp_sharded=False))


def resolve_tp(tp_group: ProcessGroup | None) -> tuple[ProcessGroup | None, int, int]:
    """(group, world size, rank) of ``tp_group``, defaulting to parallel_state's TP group."""
    group = parallel_state.get_tensor_model_parallel_group() if tp_group is None else tp_group
    return group, parallel_state.group_world_size(group), parallel_state.group_rank(group)


def tp_invariant_init(
    config: TransformerConfig, init_method: Callable[[torch.Tensor], Any], full_shape: tuple[int, int], partition_dim: int,
    stride: int, tp_rank: int, tp_size: int,
) -> Callable[[torch.Tensor], None]:
    """An ``init_method`` for TE that fills this rank's slice of a full weight drawn like the local layers'.

    TE calls it once per weight at construction, in the same order as the local layers draw
    theirs, so a seed gives the TE and the local spec identical weights at any TP size.
    """

    def init(weight: torch.Tensor) -> None:
        if config.perform_initialization:
            _initialize_affine_weight(weight, full_shape, partition_dim, init_method, stride, tp_rank, tp_size)

    return init
