"""Small helpers shared by the transformer modules and models."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_core import parallel_state
from megatron_core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory


def replace_prefix_for_sharding(sharded_state_dict: Any, old_prefix: str, new_prefix: str) -> None:
    """Rename the checkpoint keys (``.key``) that start with ``old_prefix``, in place.

    The dict keys (the module's ``state_dict`` names) are left alone: a pipeline stage holds its
    layers as ``layers.0..n-1`` locally, but stores them under their global index.

    Raises:
        ValueError: a key does not start with ``old_prefix`` (a mismatched prefix is a bug).
    """
    for value in _leaves(sharded_state_dict):
        if isinstance(value, (ShardedTensor, ShardedObject, ShardedTensorFactory)):
            if not value.key.startswith(old_prefix):
                raise ValueError(f"checkpoint key {value.key!r} does not start with {old_prefix!r}")
            value.key = new_prefix + value.key[len(old_prefix):]


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


def has_tp_partial_grad(param: torch.nn.Parameter) -> bool:
    """True for a TP-replicated parameter whose gradient on each TP rank is only a partial sum."""
    return bool(getattr(param, "sequence_parallel", False) or getattr(param, "tp_partial_grad", False))


def allreduce_tp_partial_grads(model: torch.nn.Module, tp_group: ProcessGroup | None = None,
                               grad_attr: str = "grad") -> None:
    """Sum over the TP group the gradients that each TP rank holds only in part.

    Two kinds of replicated parameters see only part of the data on each rank: with sequence
    parallelism, norms and row-parallel biases see this rank's tokens (tagged
    ``sequence_parallel``); q/k layernorms see this rank's heads (tagged ``tp_partial_grad``).
    Call this after ``backward()`` and before the optimizer step (Megatron-Core does it in
    ``finalize_model_grads``); a no-op without tensor parallelism. ``grad_attr``: which gradient to
    sum (``"main_grad"``: the data-parallel wrapper's accumulation buffer).
    """
    group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
    if parallel_state.group_world_size(group) == 1:
        return
    grads = [g for p in model.parameters()
             if has_tp_partial_grad(p) and (g := getattr(p, grad_attr, None)) is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()

