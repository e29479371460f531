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
from megatron_core.dist_checkpointing.mapping import RankOffset, ShardedStateDict  # noqa: E402
from megatron_core.module import make_sharded_tensors_for_checkpoint  # noqa: E402
from megatron_core.tensor_parallel.layers import _initialize_affine_weight  # noqa: E402

__all__ = ["TEModuleMixin", "resolve_tp", "te", "tp_invariant_init"]

EXTRA_STATE = "_extra_state"


class TEModuleMixin:
    """Checkpoint behaviour of every TE wrapper (listed first in the bases, before the TE class).

    * ``sharded_state_dict``: parameters split along ``_tp_axis_map`` (name -> TP axis), the rest
      replicated, exactly like the local twin; TE's ``_extra_state`` is not checkpointed.
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
        return make_sharded_tensors_for_checkpoint(state, prefix, self._tp_axis_map, sharded_offsets)

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
